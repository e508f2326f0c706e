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
import os
import tempfile
from pathlib import Path
from typing import IO

from PIL import Image, PngImagePlugin


def provenance() -> dict:
    """Versions of memctl, diffusers and torch (for manifests and embedded settings)."""
    import diffusers
    import torch

    import memctl

    return {"memctl": memctl.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def file_mode() -> int:
    """The mode a new file gets under the user's umask (`mkstemp` makes 0600, which temp-then-rename keeps)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_png_settings(src: str | Path | IO[bytes]) -> dict:
    """`{"parameters": str | None, "memctl": dict | None}` read back from a PNG."""
    with Image.open(src) as im:
        text = dict(getattr(im, "text", {}) or {})
    raw = text.get("memctl")
    return {"parameters": text.get("parameters"), "memctl": json.loads(raw) if raw else None}
