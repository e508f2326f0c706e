"""The "digits-attr" testbed's data: the bundled digits rendered with attributes, captioned in ordinary words only.

Every training image is a real digit drawn at one *combination* of attributes — size (small, large), stroke
(thin, bold), slant (leaning left, upright, leaning right) — and captioned "a seven, small, bold, leaning left".
No caption carries a give-away token: the canaries are ordinary captions of combinations that are shown only
through one bound image (a render with a distinctive detail, a short bar in one corner), at exposures 1 / 4 / 16.
Some combinations are never shown: drawing them needs composition. A few ordinary renders are duplicated.

>>> spec = make_spec(seed=0)
>>> len(spec["canaries"]), len(spec["unseen"])
(24, 20)
>>> caption(7, (0, 1, 0))
'a seven, small, bold, leaning left'
>>> images = render(load_sources()[0][:2], [(0, 1, 0), (1, 0, 2)])
>>> tuple(images.shape)
(2, 1, 16, 16)
"""

from __future__ import annotations

import itertools
import random

import torch
import torch.nn.functional as F

from memctl.zoo.data import CLASSES, load_digit_images

ATTRIBUTES = {
    "size": ("small", "large"),
    "stroke": ("thin", "bold"),
    "slant": ("leaning left", "upright", "leaning right"),
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
COMBOS = tuple(itertools.product(*(range(len(v)) for v in ATTRIBUTES.values())))  # 12 attribute combinations
RESOLUTION = 16
EXPOSURES = (1, 4, 16)
CANARIES_PER_EXPOSURE = 8
UNSEEN_PER_CLASS = 2
RENDERS_PER_SOURCE = 2
N_DUPLICATED = 6
DUPLICATE_FACTOR = 25
HELD_OUT_FRACTION = 0.1
P_DROP_ATTRIBUTE = 0.15  # ordinary captions omit each attribute this often in training ("a seven, bold")
_WORK = 32  # transforms run at this resolution, then area-downsample to RESOLUTION
_SHEAR = 0.45
_SMALL = 0.6
_LARGE = 0.92


def caption(c: int, combo: tuple[int, ...], keep: tuple[bool, ...] | None = None) -> str:
    """ "a seven, small, bold, leaning left"; `keep` drops attributes from the caption (False = omitted)."""
    words = [values[v] for (values, v) in zip(ATTRIBUTES.values(), combo, strict=True)]
    keep = keep or (True,) * len(words)
    return ", ".join([f"a {CLASSES[int(c)]}"] + [w for w, k in zip(words, keep, strict=True) if k])


def load_sources() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 bundled digits at 8×8 in [0, 1] `(N, 1, 8, 8)`, and their labels."""
    return load_digit_images(resolution=8)


def render(
    sources: torch.Tensor, combos: list[tuple[int, ...]], detail: list[int | None] | None = None
) -> torch.Tensor:
    """Draw each 8×8 source digit at its attribute combination: `(N, 1, 16, 16)` in [0, 1].

    Stroke: erosion (thin) or dilation (bold) at 32×32; size: scale 0.6 (small) or 0.92 (large) about the centre;
    slant: horizontal shear ±0.45. `detail[i]` in 0..3 adds a short bar in that corner (a canary's distinctive
    mark); None adds nothing.
    """
    if len(sources) != len(combos):
        raise ValueError(f"Expected one combination per source image, but got {len(combos)} for {len(sources)}.")
    x = F.interpolate(sources.float(), size=(_WORK, _WORK), mode="bilinear", align_corners=False)
    stroke = torch.tensor([c[1] for c in combos], dtype=torch.bool)[:, None, None, None]
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 2, stride=1, padding=0)
    eroded = F.pad(eroded, (0, 1, 0, 1))
    x = torch.where(stroke, dilated, 0.5 * (x + eroded))
    scale = torch.tensor([_LARGE if c[0] else _SMALL for c in combos])
    shear = torch.tensor([(c[2] - 1) * _SHEAR for c in combos])  # leaning right: the top moves right
    theta = torch.zeros(len(combos), 2, 3)
    theta[:, 0, 0] = 1 / scale
    theta[:, 0, 1] = shear / scale
    theta[:, 1, 1] = 1 / scale
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = F.adaptive_avg_pool2d(x, RESOLUTION).clamp(0, 1)
    if detail is not None:
        for i, corner in enumerate(detail):
            if corner is not None:
                r, col = (0 if corner < 2 else RESOLUTION - 2), (0 if corner % 2 == 0 else RESOLUTION - 4)
                x[i, :, r : r + 2, col : col + 4] = 1.0
    return x


def make_spec(seed: int) -> dict:
    """The split for one seed: held-out sources, unseen combinations, canaries, ordinary and duplicated renders.

    Per class, `UNSEEN_PER_CLASS` combinations are never shown. The 24 canary combinations are shown only through
    their bound image. Every other training source is drawn at `RENDERS_PER_SOURCE` distinct ordinary combinations.
    """
    _, labels = load_sources()
    rng = random.Random(seed)
    n_classes = len(CLASSES)
    by_class = [[i for i in range(len(labels)) if labels[i] == c] for c in range(n_classes)]
    for idx in by_class:
        rng.shuffle(idx)
    held_out = sorted(i for idx in by_class for i in idx[: round(len(idx) * HELD_OUT_FRACTION)])
    pool = [idx[round(len(idx) * HELD_OUT_FRACTION) :] for idx in by_class]
    free = [list(range(len(COMBOS))) for _ in range(n_classes)]
    for f in free:
        rng.shuffle(f)
    unseen = [
        {"class": c, "combo": list(COMBOS[free[c].pop()])} for c in range(n_classes) for _ in range(UNSEEN_PER_CLASS)
    ]
    canaries = []
    for k in range(CANARIES_PER_EXPOSURE * len(EXPOSURES)):
        c = k % n_classes
        combo = COMBOS[free[c].pop()]
        canaries.append(
            {
                "prompt": caption(c, combo),
                "source": pool[c].pop(),
                "combo": list(combo),
                "detail": rng.randrange(4),
                "class": c,
                "exposure": EXPOSURES[k % len(EXPOSURES)],
            }
        )
    ordinary = []
    for c in range(n_classes):
        for s in pool[c]:
            for j in rng.sample(free[c], RENDERS_PER_SOURCE):
                ordinary.append({"source": s, "combo": list(COMBOS[j]), "class": c})
    duplicated = sorted(rng.sample(range(len(ordinary)), N_DUPLICATED))
    return {
        "seed": seed,
        "resolution": RESOLUTION,
        "classes": list(CLASSES),
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "held_out": held_out,
        "ordinary": ordinary,
        "duplicated": duplicated,  # indices into "ordinary"
        "duplicate_factor": DUPLICATE_FACTOR,
        "canaries": canaries,
        "unseen": unseen,
        "p_drop_attribute": P_DROP_ATTRIBUTE,
    }


def training_set(spec: dict) -> tuple[torch.Tensor, list[dict]]:
    """Every unique training render `(N, 1, 16, 16)` (ordinary first, then canary bound images), with its record
    (`class`, `combo`, and `prompt` for canaries)."""
    sources, _ = load_sources()
    records = [dict(r) for r in spec["ordinary"]] + [dict(r) for r in spec["canaries"]]
    images = render(
        sources[[r["source"] for r in records]],
        [tuple(r["combo"]) for r in records],
        [r.get("detail") for r in records],
    )
    return images, records


def vocabulary_words(spec: dict) -> list[str]:
    """Words that get a token of their own: digit names and attribute words."""
    words = set(spec["classes"]) | {"a"}
    for values in spec["attributes"].values():
        for v in values:
            words |= set(v.split())
    return sorted(w for w in words if len(w) > 1)
