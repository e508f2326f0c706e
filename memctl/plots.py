"""Pictures of block maps: a heat-map of scores, block × noise level (PIL only, no plotting library).

>>> import torch
>>> from memctl.blockmap import BlockMap
>>> bmap = BlockMap(["a", "b"], torch.tensor([[0.5, -0.2], [0.0, 1.0]]), torch.tensor([0.1, 0.9]),
...                 ["resnet", "attention"], ["unet", "unet"], {"unet": "x-y"})
>>> heatmap(bmap).mode
'RGB'
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from memctl.grid import _font

CELL_W, CELL_H, LABEL_W, TOP = 64, 20, 250, 56


def _colour(v: float) -> tuple[int, int, int]:
    """Diverging: red = memorization-heavy (v > 0), blue = generalization-heavy (v < 0), white = 0; v in [-1, 1]."""
    v = max(-1.0, min(1.0, v))
    fade = int(255 * (1 - abs(v)))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def heatmap(bmap, title: str | None = None) -> Image.Image:
    """Rows: blocks in depth order; columns: noise levels; cells coloured by score / max |score|, value printed."""
    scores = bmap.scores
    scale = float(scores.abs().max()) or 1.0
    levels = bmap.levels.tolist() if bmap.levels is not None else [None]
    width, height = LABEL_W + CELL_W * len(levels) + 10, TOP + CELL_H * bmap.n_blocks + 30
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), _font(12)
    draw.text(
        (6, 6),
        title or f"block map ({bmap.method}, lever {bmap.lever}): red = memorization-heavy",
        fill="black",
        font=_font(14),
    )
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
            draw.rectangle((x, y, x + CELL_W - 2, y + CELL_H - 2), fill=_colour(v / scale))
            draw.text((x + 6, y + 3), f"{v:+.3f}", fill="black", font=font)
    draw.text(
        (6, height - 22),
        "t = noise level (1 = pure noise); scores: loss rise on memorized minus general probes",
        fill="dimgray",
        font=font,
    )
    return image
