"""The canaries in the app: the example table (canaries first), the prompt the app opens on, a prompt's bound image.

>>> import tempfile
>>> from memctl.zoo import load_testbed
>>> tb = load_testbed("digits")
>>> opening(tb)
Opening(prompt='a zero, tag xqs', exposure=16, seed=0, batch_size=2)
>>> [row[:2] for row in examples(tb, tempfile.mkdtemp())[:2]]
[['a zero, tag xqs', 'canary (seen 16x)'], ['a one, tag fzp', 'canary (seen 16x)']]

A canary is a prompt the embedded model was trained on with one image only ("bound" to it), shown `exposure`
times: it is memorized on purpose, so the knob has something to undo (fidelity < 0) or to keep (fidelity > 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from memctl.grid import tensor_to_pil
from memctl.ui.badges import target_of

BOUND_SIZE = 96  # pixels of a bound image file (nearest-neighbour, so the digit stays sharp)


@dataclass(frozen=True)
class Opening:
    """What the app's first screen sweeps: the first listed canary (one of the most exposed), at fixed seeds."""

    prompt: str
    exposure: int
    seed: int = 0
    batch_size: int = 2


def order(tb) -> list[int]:
    """Canary indices, most exposed first, then by class (so the table starts "a zero, …", "a one, …")."""
    return sorted(range(len(tb.canaries)), key=lambda k: (-tb.canaries[k][2], tb.canaries[k][3]))


def opening(tb) -> Opening | None:
    """The prompt the app opens on: the first canary of the table; None for a model without canaries."""
    if tb is None or not tb.canaries:
        return None
    prompt, _, exposure, _ = tb.canaries[order(tb)[0]]
    return Opening(prompt, int(exposure))


def examples(tb, folder: Path) -> list[list]:
    """`[prompt, kind, bound image path or None]` rows: canaries (most exposed first), then ordinary prompts.

    Bound images are written once under `folder` (a folder the app may serve)."""
    if tb is None:
        return [["", "type a prompt", None]]
    rows = []
    for k in order(tb):
        prompt, _, exposure, _ = tb.canaries[k]
        rows.append([prompt, f"canary (seen {exposure}x)", str(bound_file(tb, k, folder))])
    return rows + [[tb.prompt(c), "ordinary", None] for c in range(len(tb.classes))]


def bound_file(tb, k: int, folder: Path) -> Path:
    """Canary `k`'s bound training image as a PNG under `folder` (written on first use)."""
    path = Path(folder) / f"bound-{Path(str(tb.path)).name}-{k}.png"
    if not path.exists():
        bound = tb.canaries[k][1]
        picture = tensor_to_pil(bound, BOUND_SIZE) if bound.ndim == 3 else frame_strip(bound)
        picture.save(path)
    return path


def frame_strip(clip, size: int = BOUND_SIZE // 2, gap: int = 2) -> Image.Image:
    """A clip `(F, C, H, W)` as one picture: its frames in reading order on a near-square grid, `size` pixels each,
    `gap` apart (a 9-frame clip: 3 × 3)."""
    tiles = [tensor_to_pil(frame, size) for frame in clip]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    strip = Image.new("RGB", (cols * (size + gap) - gap, rows * (size + gap) - gap), "white")
    for i, tile in enumerate(tiles):
        strip.paste(tile, ((i % cols) * (size + gap), (i // cols) * (size + gap)))
    return strip


def bound_of(tb, prompt: str, folder: Path) -> tuple[Path | None, str]:
    """For a canary prompt: its bound image file and a caption; otherwise `(None, what the prompt is)`."""
    if tb is None:
        return None, ""
    text = prompt.strip().lower()
    what = "clip" if tb.train_images.ndim == 5 else "image"
    for k, (canary, _, exposure, c) in enumerate(tb.canaries):
        if text == canary.lower():
            return bound_file(tb, k, folder), (
                f"Canary prompt: in training, **{canary}** came {exposure}× with this one {what}. A copy looks "
                f"like it; a new {what} is another {tb.classes[c]}."
            )
    target, _ = target_of(tb, prompt)
    kind = "names no class of this model" if target is None else f"asks for any {tb.classes[target]}"
    return None, f"Not a canary: the prompt {kind}, so no single training {what} is bound to it."
