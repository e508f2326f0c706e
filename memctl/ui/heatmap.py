"""The block-map heat-map: one row per block, one column per noise level, drawn with PIL (no matplotlib).

>>> grid = ScoreGrid(["down_blocks.0.resnets.0", "mid_block.resnets.0"], ["t=100", "t=900"],
...                  [[0.2, -0.1], [0.9, 0.0]])
>>> picture = draw_heatmap(grid)
>>> grid.row_at(picture, y=HEADER + ROW // 2)
0

Red cells are memorization-heavy (positive score), blue cells generalization-heavy (negative), white neutral;
colours (`memctl.plots.score_colour`, the palette of `memctl.plots.heatmap` too) are scaled by the largest
|score| in the map, which the legend states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

from memctl.grid import _font
from memctl.plots import score_colour

ROW = 16  # pixels per block row
CELL = 48  # pixels per noise-level column
HEADER = 44  # legend and column labels
MARGIN = 8


@dataclass
class ScoreGrid:
    """Signed scores `(blocks, levels)`: `names[i]` is a block's dotted path, `levels[j]` a noise-level label."""

    names: list[str]
    levels: list[str]
    scores: list[list[float]]  # (len(names), len(levels))

    def __post_init__(self):
        if len(self.scores) != len(self.names) or any(len(r) != len(self.levels) for r in self.scores):
            raise ValueError(
                f"Expected scores of shape ({len(self.names)}, {len(self.levels)}), "
                f"but got rows of lengths {[len(r) for r in self.scores]}."
            )

    @property
    def scale(self) -> float:
        finite = [abs(v) for row in self.scores for v in row if math.isfinite(v)]
        return max(finite, default=0.0) or 1.0

    def table(self) -> tuple[list[str], list[list]]:
        """Headers and rows for a table: block, one column per level, and the mean score."""
        headers = ["block", *self.levels, "mean"]
        rows = [
            [name, *(round(v, 4) for v in row), round(_mean(row), 4)]
            for name, row in zip(self.names, self.scores, strict=True)
        ]
        return headers, rows

    def describe(self, i: int) -> str:
        """Markdown naming block `i` and its scores, for the "selected block" panel."""
        row = self.scores[i]
        lean = "memorization-heavy" if _mean(row) > 0 else "generalization-heavy" if _mean(row) < 0 else "neutral"
        cells = ", ".join(f"{lvl}: {v:+.4f}" for lvl, v in zip(self.levels, row, strict=True))
        return f"**{self.names[i]}** — {lean} (mean {_mean(row):+.4f})  \n{cells}"

    def row_at(self, picture: Image.Image, y: int) -> int | None:
        """The block row under pixel row `y` of `picture` (as drawn by `draw_heatmap`), or None."""
        i = (int(y) - HEADER) // ROW
        return i if 0 <= i < len(self.names) and y >= HEADER else None


def draw_heatmap(grid: ScoreGrid, selected: int | None = None) -> Image.Image:
    """The heat-map picture of `grid`; `selected` outlines one block's row."""
    font = _font(12)
    scale = grid.scale
    legend = ["red = memorization-heavy", f"blue = generalization-heavy (|score| max {scale:.3g})"]
    label_w = max((_text_width(font, n) for n in grid.names), default=60) + 2 * MARGIN
    width = max(label_w + CELL * max(len(grid.levels), 1), max(_text_width(font, t) for t in legend)) + MARGIN
    height = HEADER + ROW * max(len(grid.names), 1) + MARGIN
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    for k, text in enumerate(legend):
        draw.text((MARGIN, 2 + 12 * k), text, fill=(180, 0, 0) if k == 0 else (0, 0, 180), font=font)
    for j, level in enumerate(grid.levels):
        draw.text((label_w + j * CELL + 2, HEADER - 14), level[:8], fill="black", font=font)
    for i, (name, row) in enumerate(zip(grid.names, grid.scores, strict=True)):
        top = HEADER + i * ROW
        draw.text((MARGIN, top + 2), name, fill="black", font=font)
        for j, value in enumerate(row):
            left = label_w + j * CELL
            draw.rectangle(
                [left, top, left + CELL - 1, top + ROW - 1], fill=score_colour(value / scale), outline=(230, 230, 230)
            )
    if selected is not None and 0 <= selected < len(grid.names):
        top = HEADER + selected * ROW
        draw.rectangle([1, top - 1, width - 2, top + ROW], outline=(0, 0, 0), width=2)
    return picture


def _mean(row: list[float]) -> float:
    finite = [v for v in row if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def from_block_map(bmap) -> ScoreGrid:
    """The scores of a `memctl.BlockMap` (`names`, `scores (n_blocks, n_levels)`, `levels` or None)."""
    several = len(set(bmap.components)) > 1
    names = [f"{c}:{n}" if several else n for c, n in zip(bmap.components, bmap.names, strict=True)]
    levels = ["score"] if bmap.levels is None else [f"t={x:.2f}" for x in bmap.levels.tolist()]
    return ScoreGrid(names, levels, bmap.scores.tolist())
