"""The testbed's validity classifier: a small CNN trained on real digits only, stored as safetensors.

It is independent of the diffusion model: it never sees a generated sample. Robustness comes from light
augmentation (one-pixel shifts, pixel noise), since generated digits are slightly off-manifold.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


class DigitClassifier(nn.Module):
    """`(B, 1, 16, 16)` images in [0, 1] → `(B, 10)` logits."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, n_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, spec: dict, seed: int, epochs: int = 60):
    """Train on every real digit that is not held out; return the model and its held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    held = torch.tensor(spec["held_out"])
    mask = torch.ones(len(images), dtype=torch.bool)
    mask[held] = False
    x, y = images[mask], labels[mask]
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            b = perm[i : i + 128]
            loss = F.cross_entropy(model(_augment(x[b], gen)), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[held]).argmax(1) == labels[held]).float().mean().item()
    return model, round(accuracy, 4)


def save_classifier(model: DigitClassifier, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path) -> DigitClassifier:
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
