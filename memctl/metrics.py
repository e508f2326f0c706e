"""Measures of memorization and generalization on sets of images: copy rate, validity, novelty, diversity.

Pure tensor functions. Images are `(N, C, H, W)` floats in [0, 1]; distances are L2 over flattened pixels.

>>> train = torch.eye(4).reshape(4, 1, 2, 2)  # four one-hot 2×2 images
>>> samples = torch.stack([train[2], (train[0] + train[1]) / 2])  # an exact copy and a blend
>>> copied(samples, train)
tensor([ True, False])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from memctl.defaults import COPY_RATIO

__all__ = [
    "nearest_distances",
    "unique_images",
    "copy_index",
    "nearest_index",
    "nearest_and_copies",
    "share",
    "copied",
    "copy_rate",
    "validity",
    "same_class_distance_quantile",
    "same_class_mean_distance",
    "novel_valid",
    "novel_valid_rate",
    "collateral",
    "novelty",
    "vendi_score",
    "summarize",
]


# ----------------------------------------------------------------------------------------------------------------
# nearest neighbours and copies


def nearest_distances(samples: Tensor, reference: Tensor, k: int = 2, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """The `k` smallest L2 distances from each sample to `reference`, nearest first, with their indices.

    >>> reference = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1, 1)
    >>> nearest_distances(torch.tensor([0.8]).reshape(1, 1, 1, 1), reference)
    (tensor([[0.2000, 0.8000]]), tensor([[1, 0]]))

    Works through `chunk_size` samples at a time, so memory stays at `chunk_size × len(reference)` distances.
    Candidates come from the fast matmul form of `torch.cdist`; their distances are then recomputed directly,
    so an exact copy is at distance exactly 0.
    """
    x, ref = _flat(samples, "samples"), _flat(reference, "reference")
    _check_same_image_shape(samples, reference, "reference")
    if not 1 <= k <= len(ref):
        raise ValueError(f"Expected 1 <= k <= len(reference) = {len(ref)}, but got k={k}.")
    dtype = torch.promote_types(torch.promote_types(x.dtype, ref.dtype), torch.float32)
    x, ref = x.to(dtype), ref.to(dtype)
    dists, indices = [], []
    for chunk in x.split(chunk_size):
        candidates = torch.cdist(chunk, ref).topk(k, dim=1, largest=False).indices  # (n, k)
        exact = (chunk[:, None] - ref[candidates]).norm(dim=-1)  # (n, k)
        exact, order = exact.sort(dim=1)
        dists.append(exact)
        indices.append(candidates.gather(1, order))
    return torch.cat(dists), torch.cat(indices)


def unique_images(images: Tensor) -> tuple[Tensor, Tensor]:
    """Images with exact duplicates removed (first occurrences, in order), and their indices in `images`.

    >>> images = torch.tensor([1.0, 2.0, 1.0, 3.0]).reshape(4, 1, 1, 1)
    >>> unique_images(images)[1]
    tensor([0, 1, 3])
    """
    flat = _flat(images, "images")
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)
    positions = torch.arange(len(flat), device=flat.device)
    first = torch.full((int(inverse.max()) + 1,), len(flat), device=flat.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin").sort().values
    return images[first], first


def copy_index(samples: Tensor, train_images: Tensor, ratio: float = COPY_RATIO) -> Tensor:
    """Index in `train_images` of the image each sample copies, or -1 (Gu et al. 2023: d1 < ratio · d2).

    >>> train = torch.tensor([0.0, 1.0, 0.0, 3.0]).reshape(4, 1, 1, 1)
    >>> copy_index(torch.tensor([0.05, 0.5, 3.0]).reshape(3, 1, 1, 1), train)
    tensor([ 0, -1,  3])

    d1 and d2 are the distances to the nearest and second-nearest *distinct* training images: exact duplicates
    are merged first, since a duplicated image would otherwise be its own second neighbour (d2 = d1) and no copy
    of it could ever count. Near-duplicates are not merged. A copy reports the first occurrence of its image.
    """
    return nearest_and_copies(samples, train_images, (ratio,))[1][ratio]


def nearest_index(samples: Tensor, train_images: Tensor) -> Tensor:
    """Index in `train_images` of each sample's nearest distinct training image (its first occurrence), copy or not.

    >>> train = torch.tensor([0.0, 1.0, 0.0, 3.0]).reshape(4, 1, 1, 1)
    >>> nearest_index(torch.tensor([0.05, 0.6, 2.2]).reshape(3, 1, 1, 1), train)
    tensor([0, 1, 3])

    The loose reading of memorization beside `copy_index`: a sample drawn for a canary whose nearest training image
    is the canary's bound one sits in that image's neighbourhood even when d1 < d2 / 3 does not hold.
    """
    return nearest_and_copies(samples, train_images, ())[0]


def nearest_and_copies(
    samples: Tensor, train_images: Tensor, ratios: tuple[float, ...] = (COPY_RATIO,)
) -> tuple[Tensor, dict[float, Tensor]]:
    """`nearest_index` and `copy_index` at each of `ratios`, from one neighbour search (the search, with its
    deduplication of the training images, is the costly part; a scorer that wants several reads calls this once).

    >>> train = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1, 1)
    >>> nearest, copies = nearest_and_copies(torch.tensor([0.2, 0.3]).reshape(2, 1, 1, 1), train, (1 / 3, 1 / 2))
    >>> nearest.tolist(), copies[1 / 3].tolist(), copies[1 / 2].tolist()
    ([0, 0], [0, -1], [0, 0])
    """
    d, idx = _nearest_distinct(samples, train_images)
    return idx[:, 0], {r: torch.where(_is_copy(d, r), idx[:, 0], -1) for r in ratios}


def copied(samples: Tensor, train_images: Tensor, ratio: float = COPY_RATIO) -> Tensor:
    """Bool `(N,)`: the sample copies a training image, d1 < ratio · d2 (Gu et al. 2023); see `copy_index`.

    >>> train = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1, 1)
    >>> copied(torch.tensor([0.2, 0.4]).reshape(2, 1, 1, 1), train, ratio=1 / 2)
    tensor([ True, False])
    """
    return copy_index(samples, train_images, ratio) >= 0


def copy_rate(samples: Tensor, train_images: Tensor, ratio: float = COPY_RATIO) -> float:
    """Share of samples that copy a training image (Gu et al. 2023); see `copy_index`.

    >>> train = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1, 1)
    >>> copy_rate(torch.tensor([0.0, 0.5, 2.9, 2.0]).reshape(4, 1, 1, 1), train)
    0.5
    """
    return share(copied(samples, train_images, ratio))


def _nearest_distinct(samples: Tensor, train_images: Tensor) -> tuple[Tensor, Tensor]:
    """Two nearest distinct training images: distances `(N, 2)` and indices into `train_images` `(N, 2)`."""
    unique, first = unique_images(train_images)
    if len(unique) < 2:
        raise ValueError(f"Expected at least 2 distinct training images, but got {len(unique)}.")
    d, idx = nearest_distances(samples, unique, k=2)
    return d, first[idx]


def _is_copy(d: Tensor, ratio: float) -> Tensor:
    if not 0 < ratio <= 1:
        raise ValueError(f"Expected a ratio in (0, 1] (reports use 1/3 and 1/2), but got {ratio}.")
    return d[:, 0] < ratio * d[:, 1]


# ----------------------------------------------------------------------------------------------------------------
# validity and distances between real images of a class


def validity(pred_classes: Tensor, target_classes: Tensor | int) -> float:
    """Share of samples the classifier assigns to the class the prompt names.

    >>> validity(torch.tensor([7, 7, 1, 7]), 7)
    0.75
    """
    pred = _classes(pred_classes, "pred_classes")
    target = torch.as_tensor(target_classes, device=pred.device)
    if target.ndim != 0 and target.shape != pred.shape:
        raise ValueError(
            f"Expected target_classes as an int or of shape {tuple(pred.shape)}, but got {tuple(target.shape)}."
        )
    return share(pred == target)


def same_class_distance_quantile(
    real_images: Tensor, real_classes: Tensor, q: float, n_classes: int | None = None
) -> Tensor:
    """`(n_classes,)`: the q-quantile of L2 distances between distinct real images of each class.

    >>> images = torch.tensor([0.0, 1.0, 3.0, 5.0]).reshape(4, 1, 1, 1)
    >>> same_class_distance_quantile(images, torch.tensor([0, 0, 0, 1]), q=0.5)
    tensor([2., nan])

    Pairs are of distinct indices (i < j); quantiles interpolate linearly, as `numpy.quantile`. Classes are
    `0 … n_classes - 1` (default: the largest class id + 1); one with fewer than 2 images gets nan.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"Expected q in [0, 1], but got {q}.")
    return torch.stack([_quantile(d, q) for d in _same_class_distances(real_images, real_classes, n_classes)])


def same_class_mean_distance(real_images: Tensor, real_classes: Tensor, n_classes: int | None = None) -> Tensor:
    """`(n_classes,)`: mean L2 distance between two distinct real images of each class (normalizes `collateral`).

    >>> images = torch.tensor([0.0, 1.0, 3.0, 5.0]).reshape(4, 1, 1, 1)
    >>> same_class_mean_distance(images, torch.tensor([0, 0, 0, 1]))
    tensor([2., nan])

    Same conventions as `same_class_distance_quantile`; `.nanmean()` gives one number averaged over classes.
    """
    dists = _same_class_distances(real_images, real_classes, n_classes)
    return torch.stack([d.mean() if len(d) else d.new_tensor(math.nan) for d in dists])


def _same_class_distances(images: Tensor, classes: Tensor, n_classes: int | None) -> list[Tensor]:
    """Per class, the `(m (m - 1) / 2,)` L2 distances between its distinct images."""
    flat, classes = _flat(images, "real_images").float(), _classes(classes, "real_classes")
    if len(classes) != len(flat):
        raise ValueError(f"Expected one class per image ({len(flat)}), but got {len(classes)}.")
    if classes.min() < 0:
        raise ValueError(f"Expected class ids >= 0, but got {int(classes.min())}.")
    n_classes = int(classes.max()) + 1 if n_classes is None else n_classes
    out = []
    for c in range(n_classes):
        members = flat[classes == c]  # (m, D)
        i, j = torch.triu_indices(len(members), len(members), offset=1, device=flat.device)
        out.append(torch.cdist(members, members)[i, j])
    return out


def _quantile(values: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile with no size limit (torch.quantile refuses more than 2**24 values)."""
    if len(values) == 0:
        return values.new_tensor(math.nan)
    values = values.sort().values
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (pos - lo) * (values[hi] - values[lo])


# ----------------------------------------------------------------------------------------------------------------
# canaries, collateral, novelty, diversity


def novel_valid(
    samples: Tensor, pred_classes: Tensor, target_class: int, bound_image: Tensor, threshold: float | Tensor
) -> Tensor:
    """Bool `(N,)`: valid, and farther than `threshold` from the canary's bound image — a new seven, not a copy.

    >>> bound = torch.zeros(1, 1, 1)
    >>> samples = torch.tensor([0.1, 0.9, 0.9]).reshape(3, 1, 1, 1)
    >>> novel_valid(samples, torch.tensor([7, 7, 1]), 7, bound, threshold=0.5)
    tensor([False,  True, False])

    `threshold` is by convention the 10th percentile of same-class distances of the bound image's class,
    `same_class_distance_quantile(real, classes, 0.1)[target_class]`.
    """
    _flat(samples, "samples")
    if not isinstance(bound_image, Tensor) or bound_image.shape != samples.shape[1:]:
        raise ValueError(
            f"Expected bound_image of shape {tuple(samples.shape[1:])}, but got {_describe(bound_image)}."
        )
    pred = _classes(pred_classes, "pred_classes")
    if len(pred) != len(samples):
        raise ValueError(f"Expected one predicted class per sample ({len(samples)}), but got {len(pred)}.")
    far = (samples - bound_image).flatten(1).norm(dim=1) > float(threshold)
    return (pred == target_class) & far


def novel_valid_rate(
    samples: Tensor, pred_classes: Tensor, target_class: int, bound_image: Tensor, threshold: float | Tensor
) -> float:
    """Share of samples that are novel and valid; see `novel_valid`.

    >>> bound = torch.zeros(1, 1, 1)
    >>> samples = torch.tensor([0.1, 0.9, 0.9, 0.8]).reshape(4, 1, 1, 1)
    >>> novel_valid_rate(samples, torch.tensor([7, 7, 1, 7]), 7, bound, threshold=0.5)
    0.5
    """
    return share(novel_valid(samples, pred_classes, target_class, bound_image, threshold))


def collateral(samples: Tensor, reference_samples: Tensor, norm: float | Tensor) -> float:
    """Mean L2 between paired samples (same seed, at a fidelity vs at 0), divided by `norm`.

    >>> at_zero = torch.zeros(2, 1, 2, 2)
    >>> collateral(at_zero + 0.5, at_zero, norm=2.0)
    0.5

    `norm` is the mean L2 between two distinct real images of the same class (`same_class_mean_distance`):
    a float, or `(N,)` for one per sample (each distance is then divided by its own before the mean).
    """
    _flat(samples, "samples")
    if samples.shape != reference_samples.shape:
        raise ValueError(
            f"Expected reference_samples of shape {tuple(samples.shape)}, but got {tuple(reference_samples.shape)}."
        )
    norm = torch.as_tensor(norm, dtype=torch.float32, device=samples.device)
    if norm.ndim not in (0, 1) or (norm.ndim == 1 and len(norm) != len(samples)) or not bool((norm > 0).all()):
        raise ValueError(f"Expected norm > 0, a float or of shape ({len(samples)},), but got {norm}.")
    return ((samples - reference_samples).flatten(1).norm(dim=1) / norm).mean().item()


def novelty(copied_mask: Tensor, valid_mask: Tensor) -> float:
    """Share of valid samples that are not copies; nan when no sample is valid (the share is undefined).

    >>> novelty(torch.tensor([True, False, False, False]), torch.tensor([True, True, False, False]))
    0.5
    """
    if copied_mask.dtype != torch.bool or valid_mask.dtype != torch.bool or copied_mask.shape != valid_mask.shape:
        raise ValueError(
            f"Expected two bool masks of the same shape, but got {copied_mask.dtype} {tuple(copied_mask.shape)} "
            f"and {valid_mask.dtype} {tuple(valid_mask.shape)}."
        )
    if not valid_mask.any():
        return math.nan
    return share(~copied_mask[valid_mask])


def vendi_score(samples: Tensor, kernel: str = "cosine", sigma: float | None = None) -> float:
    """Vendi score (Friedman & Dieng 2023): exp of the entropy of the eigenvalues of K / n; from 1 to n.

    >>> round(vendi_score(torch.eye(4).reshape(4, 1, 2, 2)), 4)  # four orthogonal images
    4.0
    >>> round(vendi_score(torch.ones(4, 1, 2, 2)), 4)  # four identical images
    1.0

    `kernel="cosine"`: cosine similarity of flattened pixels, not centred (an all-zero image has none, and is
    an error: use rbf). `kernel="rbf"`: exp(-‖x - y‖² / 2σ²), with σ by default the median pairwise distance.
    """
    x = _flat(samples, "samples").double()
    if kernel == "cosine":
        norms = x.norm(dim=1)
        if not bool((norms > 0).all()):
            raise ValueError("Expected no all-zero image for the cosine kernel, but got one; use kernel='rbf'.")
        x = x / norms[:, None]
        k = x @ x.T  # (N, N)
    elif kernel == "rbf":
        d = torch.cdist(x, x)  # (N, N)
        sigma = d[~torch.eye(len(x), dtype=torch.bool)].median().item() if sigma is None and len(x) > 1 else sigma
        k = torch.exp(-(d**2) / (2 * sigma**2)) if sigma else (d == 0).double()
    else:
        raise ValueError(f"Expected kernel 'cosine' or 'rbf', but got {kernel!r}.")
    eig = torch.linalg.eigvalsh(k / len(x)).clamp(min=0)
    eig = eig[eig > 0]
    return math.exp(-(eig * eig.log()).sum().item())


def summarize(
    samples: Tensor,
    train_images: Tensor,
    pred_classes: Tensor,
    target_classes: Tensor | int,
    ratios: tuple[float, ...] = (COPY_RATIO, 1 / 2),
) -> dict[str, float]:
    """Copy rate at each ratio, validity, novelty (copies at the first ratio) and Vendi score of one set.

    >>> train = torch.eye(4).reshape(4, 1, 2, 2)
    >>> {key: round(value, 4) for key, value in summarize(train[:2], train, torch.tensor([0, 5]), 0).items()}
    {'copy_rate_0.33': 1.0, 'copy_rate_0.5': 1.0, 'validity': 0.5, 'novelty': 0.0, 'vendi': 2.0}
    """
    if not ratios:
        raise ValueError(f"Expected at least one ratio, but got {ratios}.")
    d, _ = _nearest_distinct(samples, train_images)
    copies = {ratio: _is_copy(d, ratio) for ratio in ratios}
    out = {f"copy_rate_{ratio:.2g}": share(mask) for ratio, mask in copies.items()}
    out["validity"] = validity(pred_classes, target_classes)
    out["novelty"] = novelty(copies[ratios[0]], pred_classes == torch.as_tensor(target_classes))
    out["vendi"] = vendi_score(samples)
    return out


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _flat(images: Tensor, name: str) -> Tensor:
    """`(N, D)` view of a non-empty `(N, C, H, W)` float tensor, or a ValueError naming `name`."""
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"Expected {name} as a float tensor (N, C, H, W), but got {_describe(images)}.")
    if len(images) == 0 or images[0].numel() == 0:
        raise ValueError(f"Expected a non-empty {name}, but got shape {tuple(images.shape)}.")
    return images.flatten(1)


def _check_same_image_shape(samples: Tensor, other: Tensor, name: str) -> None:
    _flat(other, name)
    if samples.shape[1:] != other.shape[1:]:
        raise ValueError(
            f"Expected {name} images of shape {tuple(samples.shape[1:])}, but got {tuple(other.shape[1:])}."
        )


def _classes(classes: Tensor, name: str) -> Tensor:
    """A non-empty 1-D integer tensor of class ids, or a ValueError naming `name`."""
    if not isinstance(classes, Tensor) or classes.ndim != 1 or classes.is_floating_point() or len(classes) == 0:
        raise ValueError(f"Expected {name} as a non-empty 1-D integer tensor, but got {_describe(classes)}.")
    return classes


def share(mask: Tensor) -> float:
    """Share of True in a bool mask, as a Python float (exact for counts, unlike a float32 mean)."""
    return mask.sum().item() / mask.numel()


def _describe(x) -> str:
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
