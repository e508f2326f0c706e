"""`ProbeSet`: examples a model memorized and examples it must generalize on, as (condition, image) pairs.

>>> import torch
>>> probes = ProbeSet(memorized=[("a seven, tag kzq", torch.zeros(1, 16, 16))], general=[("a seven", None)])
>>> probes.summary()["memorized"], probes.has_images("general")
(1, False)

A condition is a prompt (str) or a class label (int) for class-conditional models; an image is a PIL image or a
float tensor `(C, H, W)` in [0, 1], or None for prompt-only probes of text-conditional models.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

Condition = str | int


def _as_tensor(image, where: str) -> torch.Tensor | None:
    if image is None:
        return None
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("L") if image.mode in ("L", "I", "F", "1") else image.convert("RGB"))
        t = torch.from_numpy(arr.copy()).float().div(255)
        return t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.is_floating_point():
        if image.numel() == 0:
            raise ValueError(f"Expected {where} image with pixels, but got an empty tensor {tuple(image.shape)}.")
        lo, hi = float(image.min()), float(image.max())
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0 and hi <= 1):
            raise ValueError(f"Expected {where} image values in [0, 1], but got values in [{lo:.3g}, {hi:.3g}].")
        return image.detach().float().cpu()
    got = (
        f"tensor of shape {tuple(image.shape)} and dtype {image.dtype}"
        if isinstance(image, torch.Tensor)
        else type(image).__name__
    )
    raise ValueError(
        f"Expected {where} image to be a PIL image, a float tensor (C, H, W) in [0, 1] or None, but got {got}."
    )


def _check_pairs(pairs, role: str) -> list[tuple[Condition, torch.Tensor | None]]:
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"Expected `{role}` to be a non-empty list of (condition, image) pairs, but got {pairs!r}.")
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"Expected {role}[{i}] to be a (condition, image) pair, but got {pair!r}.")
        cond, image = pair
        if isinstance(cond, bool) or not isinstance(cond, (str, int)):
            raise ValueError(
                f"Expected {role}[{i}]'s condition to be a prompt (str) or a class label (int), but got {cond!r}."
            )
        out.append((cond, _as_tensor(image, f"{role}[{i}]'s")))
    return out


@dataclass
class ProbeSet:
    """Memorized and general probes; validated on construction."""

    memorized: list = field(default_factory=list)
    general: list = field(default_factory=list)

    def __post_init__(self):
        self.memorized = _check_pairs(self.memorized, "memorized")
        self.general = _check_pairs(self.general, "general")
        shapes = {tuple(im.shape) for _, im in self.memorized + self.general if im is not None}
        if len(shapes) > 1:
            raise ValueError(f"Expected every probe image to have one shape, but got {sorted(shapes)}.")

    def has_images(self, role: str = "both") -> bool:
        roles = ("memorized", "general") if role == "both" else (role,)
        return all(im is not None for r in roles for _, im in getattr(self, r))

    def conditions(self, role: str) -> list[Condition]:
        return [c for c, _ in getattr(self, role)]

    def images(self, role: str) -> torch.Tensor:
        """`(N, C, H, W)` in [0, 1]; an error when some probe of `role` has no image."""
        if not self.has_images(role):
            raise ValueError(
                f"Expected every {role} probe to have an image for this method, but some have None. "
                "Use a prompt-only method (method='prompt') or add the images."
            )
        return torch.stack([im for _, im in getattr(self, role)])

    def summary(self) -> dict:
        """Counts and a digest of the probes (saved in a block map's metadata)."""
        h = hashlib.sha256()
        for role in ("memorized", "general"):
            for cond, im in getattr(self, role):
                h.update(f"{role}|{cond!r}|".encode())
                if im is not None:
                    h.update(im.numpy().tobytes())
        return {
            "memorized": len(self.memorized),
            "general": len(self.general),
            "images": self.has_images(),
            "sha256": h.hexdigest()[:16],
        }


def default_method(pipe, probes: ProbeSet, granularity: str = "unit") -> str:
    """The probe method `memctl.probe` takes when none is given: the best measured lever (README, Results).

    "condition" for (prompt, image) probes of a pixel-space text-to-image pipeline (its condition lever de-copies
    canaries where ablation maps do not); "prompt" for probes without images (the condition lever where the denoiser
    cross-attends to the prompt, else the residual one); "ablation" otherwise, and for any `granularity` but "unit".
    """
    if granularity != "unit":
        return "ablation"
    if not probes.has_images():
        return "prompt"
    text = all(isinstance(c, str) for c in probes.conditions("memorized") + probes.conditions("general"))
    pixel = text and getattr(pipe, "vae", None) is None and hasattr(pipe, "encode_prompt")
    return "condition" if pixel else "ablation"
