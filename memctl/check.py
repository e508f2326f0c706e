"""Output-side check: is each generated image a copy of an image in the user's own data set?

    >>> import tempfile
    >>> from PIL import Image
    >>> data, out = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> for i, v in enumerate((0, 120, 250)):
    ...     Image.new("L", (8, 8), v).save(data / f"train{i}.png")
    >>> Image.new("L", (8, 8), 118).save(out / "sample.png")
    >>> [(r.output, r.nearest, r.copied) for r in check_folder(out, data)]
    [('sample.png', 'train1.png', True)]

For every image in the output folder: its nearest image in the data folder, the distance d1 to it and d2 to the
second-nearest *distinct* one (exact duplicates merged first), and the copy criterion of Gu et al. 2023
(`memctl.metrics`): d1 < ratio · d2, ratio 1/3 by default. Distances are L2 on pixels in [0, 1] (the data images
resized to the outputs' size: the embedded models' measure), or on features from an extractor the user chooses:
`features="module:function"` names a callable that maps a float tensor `(N, C, H, W)` in [0, 1] to `(N, D)`
features (e.g. a wrapped CLIP or DINO image encoder for latent models).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memctl.defaults import COPY_RATIO
from memctl.metrics import nearest_distances, unique_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class CopyCheck:
    """One output against the data set."""

    output: str  # file name relative to the output folder
    nearest: str  # file name relative to the data folder
    d1: float
    d2: float
    ratio: float  # d1 / d2
    copied: bool  # d1 < threshold · d2

    def to_dict(self) -> dict:
        return asdict(self)


def image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Expected a folder of images, but {str(folder)!r} is not a folder.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"Expected image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}, but found none.")
    return files


def load_images(files: list[Path], size: tuple[int, int] | None = None, mode: str | None = None) -> torch.Tensor:
    """`(N, C, H, W)` float in [0, 1]; every image in the first one's mode and size unless given."""
    first = Image.open(files[0])
    mode = mode or ("L" if first.mode in ("L", "1", "I", "I;16") else "RGB")
    size = size or first.size
    arrays = [np.asarray(Image.open(f).convert(mode).resize(size, Image.BILINEAR), dtype=np.float32) for f in files]
    x = torch.from_numpy(np.stack(arrays)) / 255.0  # (N, H, W) or (N, H, W, C)
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


def feature_extractor(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`"pixels"` (identity) or `"module:function"`, a callable `(N, C, H, W) -> (N, D)`."""
    if spec == "pixels":
        return lambda x: x
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"Expected --features 'pixels' or 'module:function', but got {spec!r}.")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Expected an importable callable {spec!r}, but importing it failed: {err}") from err
    if not callable(fn):
        raise ValueError(f"Expected {spec!r} to be callable, but got {type(fn).__name__}.")
    return fn


def check_folder(
    out_dir: str | Path,
    data_dir: str | Path,
    features: str = "pixels",
    threshold: float = COPY_RATIO,
    batch: int = 256,
) -> list[CopyCheck]:
    """Nearest data image and the copy verdict for every image in `out_dir`."""
    if not 0 < threshold <= 1:
        raise ValueError(f"Expected a threshold in (0, 1] (reports use 1/3 and 1/2), but got {threshold}.")
    outs, data = image_files(out_dir), image_files(data_dir)
    extract = feature_extractor(features)
    samples = load_images(outs)
    train = load_images(
        data, size=(samples.shape[-1], samples.shape[-2]), mode="L" if samples.shape[1] == 1 else "RGB"
    )
    with torch.no_grad():
        fs = torch.cat([_features(extract, x) for x in samples.split(batch)])
        ft = torch.cat([_features(extract, x) for x in train.split(batch)])
    unique, first = unique_images(ft)
    if len(unique) < 2:
        raise ValueError(f"Expected at least 2 distinct images in {data_dir}, but got {len(unique)}.")
    d, idx = nearest_distances(fs, unique, k=2)
    nearest = first[idx[:, 0]]
    rows = []
    for i, f in enumerate(outs):
        d1, d2 = float(d[i, 0]), float(d[i, 1])
        ratio = d1 / d2 if d2 > 0 else float("inf")
        rows.append(CopyCheck(str(f.relative_to(out_dir)), str(data[int(nearest[i])].relative_to(data_dir)),
                              d1, d2, ratio, bool(d1 < threshold * d2)))  # fmt: skip
    return rows


def _features(extract, x: torch.Tensor) -> torch.Tensor:
    """`(N, D, 1, 1)` features (a 4-D float tensor, as `memctl.metrics` takes images)."""
    f = extract(x)
    if not isinstance(f, torch.Tensor) or f.ndim < 2 or len(f) != len(x):
        raise ValueError(f"Expected the extractor to return (N, D) features for {len(x)} images, but got {f!r:.100}.")
    return f.float().flatten(1)[:, :, None, None]


def format_checks(rows: list[CopyCheck], threshold: float) -> str:
    """The table `memctl check` prints."""
    width = max(len(r.output) for r in rows)
    lines = [f"{'output':<{width}}  {'d1':>8}  {'d2':>8}  {'d1/d2':>6}  copy  nearest"]
    for r in rows:
        lines.append(f"{r.output:<{width}}  {r.d1:>8.4f}  {r.d2:>8.4f}  {r.ratio:>6.3f}  "
                     f"{'YES' if r.copied else '':<4}  {r.nearest}")  # fmt: skip
    n = sum(r.copied for r in rows)
    return "\n".join(lines) + f"\n\n{n} of {len(rows)} outputs are copies (d1 < {threshold:.3g} · d2, Gu et al. 2023)."
