"""Pictures of block maps: a heat-map of scores, block × noise level (PIL only, no plotting library).

>>> import torch
>>> from memctl.blockmap import BlockMap
>>> bmap = BlockMap(["a", "b"], torch.tensor([[0.5, -0.2], [0.0, 1.0]]), torch.tensor([0.1, 0.9]),
...                 ["resnet", "attention"], ["unet", "unet"], {"unet": "x-y"})
>>> heatmap(bmap).mode
'RGB'
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from memctl.grid import _font, wrap

CELL_W, CELL_H, LABEL_W, TOP = 64, 20, 250, 56


def score_colour(v: float) -> tuple[int, int, int]:
    """The one block-map palette (these pictures and the app's): diverging, red = memorization-heavy (v > 0), blue =
    generalization-heavy (v < 0), white = 0, grey = not a number; v in [-1, 1] (score / max |score|).

    >>> score_colour(1.0), score_colour(-0.5), score_colour(0.0)
    ((255, 0, 0), (127, 127, 255), (255, 255, 255))
    """
    if not math.isfinite(v):
        return (200, 200, 200)
    v = max(-1.0, min(1.0, v))
    fade = int(255 * (1 - abs(v)))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


_SCORES = {  # what a score measures, by probe method
    "prompt": "score = how much pulling the block's lever lowers the memorization signal of memorized prompts more "
    "than of general ones.",
    "ablation": "score = loss rise on memorized minus general probes when the block is zeroed.",
    "condition": "score = loss rise on memorized minus general probes when the block's memorized prompt tokens are "
    "swapped for general ones.",
}


def notes(bmap) -> list[str]:
    """What the heat-map's colours, zero rows and scores mean for this map (the lines under the picture)."""
    scores = bmap.scores
    lines = ["red = memorization-heavy: the knob acts most here. blue = generalization-heavy"
             + ("." if bool((scores < 0).any()) else ": none in this map, no block scored below 0.")]  # fmt: skip
    zero = int((scores == 0).all(dim=1).sum())
    if zero and bmap.lever == "condition":
        lines.append(f"{zero} of {bmap.n_blocks} rows are 0: this map's lever swaps prompt tokens inside "
                     "cross-attention, so only the attention blocks, which read the prompt, can score.")  # fmt: skip
    elif zero:
        lines.append(f"{zero} of {bmap.n_blocks} rows are 0: the probe measured no difference there.")
    levels = "t = noise level (1 = pure noise). " if bmap.levels is not None and len(bmap.levels) > 1 else ""
    lines.append(levels + _SCORES.get(bmap.method.split("+")[0], "score: the map's own (method " + bmap.method + ")"))
    return lines


def heatmap(bmap, title: str | None = None) -> Image.Image:
    """Rows: blocks in depth order; columns: noise levels; cells coloured by score / max |score|, value printed;
    under it, what the colours, zero rows and scores mean (`notes`)."""
    scores = bmap.scores
    scale = float(scores.abs().max()) or 1.0
    levels = bmap.levels.tolist() if bmap.levels is not None else [None]
    title = title or f"Block map ({bmap.method} probe): which blocks carry memorization"
    title_width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=_font(14))
    width = max(LABEL_W + CELL_W * len(levels) + 10, int(title_width) + 12)
    lines = [line for note in notes(bmap) for line in wrap(note, width - 12, _font(12))]
    height = TOP + CELL_H * bmap.n_blocks + 12 + 16 * len(lines)
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), _font(12)
    draw.text((6, 6), title, fill="black", font=_font(14))
    for j, lv in enumerate(levels):
        draw.text(
            (LABEL_W + j * CELL_W + 8, TOP - 18), "score" if lv is None else f"t={lv:.2f}", fill="dimgray", font=font
        )
    for i, name in enumerate(bmap.names):
        y = TOP + i * CELL_H
        draw.text((6, y + 3), f"{name} ({bmap.kinds[i]})", fill="black", font=font)
        for j in range(len(levels)):
            v = float(scores[i, j])
            x = LABEL_W + j * CELL_W
            draw.rectangle((x, y, x + CELL_W - 2, y + CELL_H - 2), fill=score_colour(v / scale))
            draw.text((x + 6, y + 3), f"{v:+.3f}", fill="black", font=font)
    for k, line in enumerate(lines):
        draw.text((6, TOP + CELL_H * bmap.n_blocks + 8 + 16 * k), line, fill="dimgray", font=font)
    return image
