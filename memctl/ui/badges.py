"""Copy / novelty badges under each image of an embedded model, from `memctl.metrics` and the testbed's truth.

>>> tb = load_testbed("digits")                         # doctest: +SKIP
>>> [b.text for b in badges(tb, images, "a seven")]     # doctest: +SKIP
['novel: a new seven', 'COPY of training image #412']

A copy is a sample whose nearest training image is closer than 1/3 of the second nearest (Gu et al. 2023).
For a canary prompt, *novel* means valid and farther from the canary's bound image than the 10th percentile of
distances between real images of that digit (`metrics.novel_valid`); for an ordinary prompt, valid and not a
copy (`metrics.novelty`'s definition).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from memctl import metrics
from memctl.zoo.video_testbed import fold

_Q10: dict[str, torch.Tensor] = {}  # testbed path -> (n_classes,) same-class distance 10th percentiles


@dataclass
class Badge:
    copy_of: int | None  # index into the testbed's train_images, or None
    predicted: str  # the class the validity classifier sees
    target: str | None  # the class the prompt names (None when the prompt names none)
    novel: bool
    canary: bool

    @property
    def valid(self) -> bool | None:
        return None if self.target is None else self.predicted == self.target

    @property
    def text(self) -> str:
        if self.copy_of is not None:
            return f"COPY of training image #{self.copy_of}"
        if self.target is None:
            return f"not a copy; reads as '{self.predicted}'"
        if not self.valid:
            return f"invalid: reads as '{self.predicted}', not '{self.target}'"
        if self.novel:
            return f"novel: a new {self.target}"
        return f"valid {self.target}, near the canary's image (not novel)"

    @property
    def frame(self) -> str | None:
        """Frame colour on contact sheets, as `memctl demo` draws them: red = copy, green = novel."""
        return "red" if self.copy_of is not None else "green" if self.novel else None

    @property
    def colour(self) -> str:
        if self.copy_of is not None:
            return "#c62828"
        if self.valid is False:
            return "#8d6e63"
        return "#2e7d32" if self.novel else "#546e7a"


def badges(tb, images: list, prompt: str) -> list[Badge]:
    """One `Badge` per sample generated from `prompt` by the testbed's model: a PIL image, or on a video testbed a
    clip (a list of PIL frames), judged whole (clips as images with their frames on the channel axis)."""
    if not images:
        return []
    x = torch.stack([_sample_tensor(tb, im) for im in images])  # (N, C, H, W) in [0, 1]; clips (N, F·C, H, W)
    copy_idx = metrics.copy_index(x, _folded(tb, tb.train_images)).tolist()
    pred = tb.classify(x)
    target, bound = target_of(tb, prompt)
    if target is None:
        novel = [False] * len(images)
    elif bound is not None:
        novel = metrics.novel_valid(x, pred, target, _folded(tb, bound), _q10(tb)[target]).tolist()
    else:
        novel = ((pred == target) & (torch.tensor(copy_idx) < 0)).tolist()
    names = tb.classes
    return [
        Badge(None if k < 0 else k, names[int(p)], None if target is None else names[target], n, bound is not None)
        for k, p, n in zip(copy_idx, pred.tolist(), novel, strict=True)
    ]


def target_of(tb, prompt: str) -> tuple[int | None, torch.Tensor | None]:
    """The class a prompt names and, for a canary prompt, its bound image `(C, H, W)`."""
    text = prompt.strip().lower()
    for canary_prompt, image, _, c in tb.canaries:
        if text == canary_prompt.lower():
            return int(c), image
    words = set(re.findall(r"[a-z]+", text))
    named = [c for c, name in enumerate(tb.classes) if name.lower() in words]
    return (named[0], None) if len(named) == 1 else (None, None)


def _q10(tb) -> torch.Tensor:
    key = str(tb.path)
    if key not in _Q10:
        _Q10[key] = metrics.same_class_distance_quantile(
            _folded(tb, tb.train_images), tb.train_classes, 0.1, n_classes=len(tb.classes)
        )
    return _Q10[key]


def _folded(tb, x: torch.Tensor) -> torch.Tensor:
    """On a video testbed, clips `(..., F, C, H, W)` as images `(..., F·C, H, W)`; images as they are."""
    return fold(x) if tb.train_images.ndim == 5 else x


def _sample_tensor(tb, sample) -> torch.Tensor:
    """A PIL image `(C, H, W)`, or a clip of PIL frames `(F·C, H, W)` with C the testbed's channels."""
    if not isinstance(sample, (list, tuple)):
        return image_tensor(sample)
    frames = torch.stack([image_tensor(f) for f in sample])  # (F, C', H, W)
    channels = tb.train_images.shape[-3]
    if frames.shape[1] != channels and channels == 1:  # RGB frames of a grey model: one channel
        frames = frames.mean(1, keepdim=True)
    return frames.flatten(0, 1)


def image_tensor(image) -> torch.Tensor:
    """A PIL image as a float tensor `(C, H, W)` in [0, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())  # (C, H, W)
