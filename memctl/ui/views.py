"""What the app shows of samples: enlarged views, caption badges, the sweep's sheet, fidelity labels, model info.

>>> fidelity_label(-0.5), fidelity_label(0.0), fidelity_label(1.0)
('−0.5', '0', '+1.0')
"""

from __future__ import annotations

import html

from PIL import Image

from memctl.grid import make_grid
from memctl.ui import badges as badge_lib
from memctl.ui.engine import Loaded, Sample

SWEEP = (-1.0, -0.5, 0.0, 0.5, 1.0)
SHEET_LABEL_WIDTH = 90  # pixels for "seed" over "4294967295" left of a sweep row
VIEW = 256  # display size of tiny images in the A/B slider and the example thumbnails


def enlarge(image: Image.Image, size: int = VIEW) -> Image.Image:
    scale = max(1, size // max(image.size))
    return image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)


def badges_html(captions: list[tuple]) -> str:
    """One line per image: a coloured pill (red = copy, green = novel, grey = neither, brown = invalid)."""
    style = "color:white;border-radius:8px;padding:1px 8px;display:inline-block"
    lines = []
    for text, badge in captions:
        inner = html.escape(text)
        if badge is not None:
            inner = f'<span style="background:{badge.colour};{style}">{inner}</span>'
        lines.append(f'<div class="memctl-caption">{inner}</div>')
    return "".join(lines)


def sweep_sheet(rows: list[list[Sample]], captions: list[tuple]) -> Image.Image:
    """One picture of the sweep: a row per seed, a column per fidelity; red frame = copy, green = novel."""
    frames = [badge.frame if badge is not None else None for _, badge in captions]
    n = len(SWEEP)
    sheet_rows = [
        (f"seed\n{row[0].seed}", [badge_lib.image_tensor(s.image) for s in row], frames[i * n : (i + 1) * n])
        for i, row in enumerate(rows)
    ]
    header = [fidelity_label(f).replace("\u2212", "-") for f in SWEEP]  # the sheet's font has no minus sign
    return make_grid(sheet_rows, header=header, label_width=SHEET_LABEL_WIDTH, axis=(0, "new", "faithful"))


def fidelity_label(fidelity: float) -> str:
    """A fidelity as a column caption: "−1.0", "−0.5", "0", "+0.5", "+1.0" (a true minus sign)."""
    return "0" if fidelity == 0 else f"{fidelity:+.1f}".replace("-", "\u2212")


def model_info(loaded: Loaded) -> str:
    den = loaded.denoiser
    kind = "embedded testbed" if loaded.testbed is not None else "diffusers pipeline"
    extra = f", {len(loaded.testbed.canaries)} canaries" if loaded.testbed is not None else ""
    return (
        f"**{loaded.source}** — {kind}{extra}; {type(loaded.pipe).__name__} with {type(den).__name__}"
        f"{' (video)' if loaded.is_video else ''}"
    )


def side_by_side(a: Image.Image, b: Image.Image, gap: int = 8) -> Image.Image:
    """`a` left and `b` right on one white canvas, `gap` pixels apart (a video A/B frame)."""
    canvas = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height)), "white")
    canvas.paste(a.convert("RGB"), (0, 0))
    canvas.paste(b.convert("RGB"), (a.width + gap, 0))
    return canvas
