"""Settings embedded in outputs: PNG text chunks (`parameters`, A1111-style, and `memctl`, JSON).

>>> from PIL import Image
>>> import io
>>> buf = io.BytesIO()
>>> save_png(Image.new("L", (4, 4)), buf, {"seed": 1}, parameters="a seven\\nSeed: 1")
>>> read_png_settings(io.BytesIO(buf.getvalue()))["memctl"]["seed"]
1
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from PIL import Image, PngImagePlugin

from memctl.atomic import atomic_file, file_mode

__all__ = ["file_mode", "png_info", "provenance", "read_png_settings", "save_png"]


def provenance() -> dict:
    """Versions of memctl, diffusers and torch (for manifests and embedded settings)."""
    import diffusers
    import torch

    import memctl

    return {"memctl": memctl.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def png_info(settings: dict, parameters: str | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    info.add_text("memctl", json.dumps(settings, sort_keys=True))
    return info


def save_png(image: Image.Image, dest: str | Path | IO[bytes], settings: dict, parameters: str | None = None) -> None:
    """Write a PNG with the settings embedded; a path is written atomically (temp file + rename)."""
    info = png_info(settings, parameters)
    if not isinstance(dest, (str, Path)):
        image.save(dest, format="PNG", pnginfo=info)
        return
    with atomic_file(dest) as f:
        image.save(f, format="PNG", pnginfo=info)


def read_png_settings(src: str | Path | IO[bytes]) -> dict:
    """`{"parameters": str | None, "memctl": dict | None}` read back from a PNG."""
    with Image.open(src) as im:
        text = dict(getattr(im, "text", {}) or {})
    raw = text.get("memctl")
    return {"parameters": text.get("parameters"), "memctl": json.loads(raw) if raw else None}
