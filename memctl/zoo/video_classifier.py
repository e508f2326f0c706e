"""The moving-digits testbed's validity classifier: a `DigitClassifier` that reads the digit in one 16×16 frame.

Trained on frames of clips rendered from real digits only (never a generated sample): every non-held-out source
digit on random paths, a quarter of them with a canary-style corner bar, so that the bar does not sway the reading.
Its held-out accuracy is measured on frames of the held-out digits.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from memctl.zoo import moving
from memctl.zoo.classifier import DigitClassifier, _fit

CLIPS_PER_SOURCE = 2
FRAMES_PER_CLIP = 3


def _frames(indices: list[int], rng: random.Random, marks: bool) -> tuple[torch.Tensor, torch.Tensor]:
    sources, labels = moving.load_sources()
    picks = [i for i in indices for _ in range(CLIPS_PER_SOURCE)]
    combos = [moving.COMBOS[rng.randrange(len(moving.COMBOS))] for _ in picks]
    starts = [moving.random_start(c, rng) for c in combos]
    detail = [rng.randrange(4) if marks and rng.random() < 0.25 else None for _ in picks]
    clips = moving.render(sources[picks], combos, starts, detail)  # (N, F, 1, H, W)
    which = torch.tensor([rng.sample(range(moving.FRAMES), FRAMES_PER_CLIP) for _ in picks])  # (N, k)
    x = clips[torch.arange(len(picks))[:, None], which].flatten(0, 1)  # (N k, 1, H, W)
    y = labels[picks].repeat_interleave(FRAMES_PER_CLIP)
    return x, y


def train_frame_classifier(spec: dict, seed: int, epochs: int = 20):
    """Train on frames of every non-held-out digit; return the model and its held-out frame accuracy."""
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    held = set(spec["held_out"])
    n = len(moving.load_sources()[1])
    x, y = _frames([i for i in range(n) if i not in held], rng, marks=True)
    model = _fit(DigitClassifier(), x, y, F.cross_entropy, epochs, gen)
    xh, yh = _frames(sorted(held), rng, marks=False)
    with torch.no_grad():
        accuracy = (model(xh).argmax(1) == yh).float().mean().item()
    return model, round(accuracy, 4)
