"""Labelled image grids for contact sheets: one row per prompt or setting, a text label on the left.

>>> import torch
>>> sheet = make_grid([("a seven", torch.zeros(3, 1, 16, 16))], title="demo")
>>> sheet.mode
'RGB'
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

CELL = 64
PAD = 4
LABEL_WIDTH = 260


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def tensor_to_pil(x: torch.Tensor, size: int = CELL) -> Image.Image:
    """`(C, H, W)` in [0, 1] → an RGB tile of `size` pixels (nearest-neighbour, so pixels stay visible)."""
    arr = (x.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()  # (H, W, C)
    image = Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr)
    return image.convert("RGB").resize((size, size), Image.NEAREST)


def _tile(x: torch.Tensor | Image.Image, size: int) -> Image.Image:
    """A `size`-pixel square tile: tensors as `tensor_to_pil`; PIL images fitted whole, on white (nearest-neighbour
    when enlarged, so pixels stay visible)."""
    if not isinstance(x, Image.Image):
        return tensor_to_pil(x, size)
    method = Image.NEAREST if size >= max(x.size) else Image.LANCZOS
    return ImageOps.pad(x.convert("RGB"), (size, size), method=method, color="white")


def wrap(text: str, width: int, font) -> list[str]:
    """`text` in lines no wider than `width` pixels in `font` (breaking at spaces; newlines kept)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            if line and measure(f"{line} {word}", font=font) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def draw_axis(draw: ImageDraw.ImageDraw, x0: int, x1: int, y: int, left: str, right: str) -> None:
    """A two-headed arrow from `x0` to `x1` at height `y` with a tick in the middle, `left` and `right` above its
    ends: "← new | faithful →" drawn as lines (the default font has no arrow glyphs)."""
    mid, font = (x0 + x1) // 2, _font(12)
    draw.line((x0, y, x1, y), fill="black", width=2)
    draw.polygon([(x0 - 2, y), (x0 + 8, y - 5), (x0 + 8, y + 5)], fill="black")
    draw.polygon([(x1 + 2, y), (x1 - 8, y - 5), (x1 - 8, y + 5)], fill="black")
    draw.line((mid, y - 6, mid, y + 6), fill="black", width=2)
    draw.text((x0, y - 18), left, fill="black", font=font)
    draw.text((x1 - draw.textlength(right, font=font), y - 18), right, fill="black", font=font)


def make_grid(
    rows: list[tuple],
    title: str = "",
    header: list[str] | None = None,
    cell: int = CELL,
    label_width: int = LABEL_WIDTH,
    axis: tuple[int, str, str] | None = None,
    footer: str = "",
) -> Image.Image:
    """Rows of `(label, images)` or `(label, images, marks)`; `cell` pixels per tile.

    `images`: `(N, C, H, W)`, or a list of `(C, H, W)` tensors or PIL images with None for an empty cell; `marks`: a
    colour name (or None) per tile, drawn as a frame around it, e.g. red for a copy. `header` labels the columns;
    `axis` = `(first column, left text, right text)` draws an arrow over the columns from there on (`draw_axis`);
    `footer` is wrapped to the sheet's width under the rows."""
    n_cols = max(len(r[1]) for r in rows)
    top = (28 if title else 0) + (26 if axis else 0) + (22 if header else 0)
    width = label_width + n_cols * (cell + PAD) + PAD
    if title:  # never cut the title off
        width = max(width, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=_font(18))) + 2 * PAD)
    notes = wrap(footer, width - 2 * PAD, _font(12)) if footer else []
    height = top + len(rows) * (cell + PAD) + PAD + (16 * len(notes) + 8 if notes else 0)
    sheet = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    if title:
        draw.text((PAD, 6), title, fill="black", font=_font(18))
    if axis:
        start, left, right = axis
        x0, x1 = label_width + start * (cell + PAD) + PAD, label_width + n_cols * (cell + PAD) - 1
        draw_axis(draw, x0, x1, top - (22 if header else 0) - 6, left, right)
    if header:
        for j, text in enumerate(header):
            draw.text((label_width + j * (cell + PAD) + PAD, top - 20), text, fill="dimgray", font=_font(11))
    for i, row in enumerate(rows):
        label, images = row[0], row[1]
        marks = row[2] if len(row) > 2 else [None] * len(images)
        y = top + i * (cell + PAD) + PAD
        draw.multiline_text((PAD, y + cell // 2 - 8 * (label.count("\n") + 1)), label, fill="black", font=font)
        for j, x in enumerate(images):
            if x is None:
                continue
            left = label_width + j * (cell + PAD) + PAD
            sheet.paste(_tile(x, cell), (left, y))
            if marks[j]:
                draw.rectangle((left - 2, y - 2, left + cell + 1, y + cell + 1), outline=marks[j], width=2)
    for k, line in enumerate(notes):
        draw.text((PAD, top + len(rows) * (cell + PAD) + PAD + 4 + 16 * k), line, fill="dimgray", font=_font(12))
    return sheet
