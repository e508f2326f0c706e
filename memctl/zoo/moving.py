"""The "moving-digits" testbed's data: clips of a bundled digit moving across a canvas, captioned in ordinary words.

Every training clip shows one real 8×8 digit drawn at 8×8 px moving across a 16×16 canvas for 9 frames, in one
*combination* of direction (left, right, up, down) and speed (slowly: 4 px in all, fast: 8 px), captioned
"a three moving left, fast". No caption carries a give-away token: the canaries are ordinary captions of
combinations that are shown only through one bound clip (one digit, one path, a short static bar in one corner) at
exposures 1 / 4 / 16. Some combinations are never shown: drawing them needs motion composition. A few ordinary
clips are duplicated.

>>> spec = make_spec(seed=0)
>>> len(spec["canaries"]), len(spec["unseen"])
(12, 20)
>>> caption(3, (0, 1))
'a three moving left, fast'
>>> caption(3, (0, 1), keep=(False, True))
'a three moving fast'
>>> clips = render(load_sources()[0][:2], [(0, 1), (3, 0)], [(16, 8), (4, 0)])
>>> tuple(clips.shape)
(2, 9, 1, 16, 16)
"""

from __future__ import annotations

import itertools
import random

import torch
import torch.nn.functional as F

from memctl.zoo.data import CLASSES, load_digit_images

DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "fast")
ATTRIBUTES = {"direction": DIRECTIONS, "speed": SPEEDS}
COMBOS = tuple(itertools.product(range(len(DIRECTIONS)), range(len(SPEEDS))))  # 8 motion combinations
FRAMES = 9
RESOLUTION = 16
EXPOSURES = (1, 4, 16)
CANARIES_PER_EXPOSURE = 4
UNSEEN_PER_CLASS = 2
N_DUPLICATED = 6
DUPLICATE_FACTOR = 25
HELD_OUT_FRACTION = 0.1
P_DROP_ATTRIBUTE = 0.15  # ordinary captions omit each attribute this often in training ("a three moving left")
_WORK = 32  # clips are drawn at 32×32 (sprite 16×16), then area-downsampled to 16×16: sub-pixel motion
_SPRITE = 16
_STEP = (1, 2)  # work pixels per frame: slowly, fast (4 and 8 px over the clip at 16×16)
_VECTORS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # (dx, dy) per direction; y grows downwards
SPEED_SPLIT = 0.7  # px per frame between slowly (0.5) and fast (1)


def caption(c: int, combo: tuple[int, int], keep: tuple[bool, bool] | None = None) -> str:
    """ "a three moving left, fast"; `keep` drops direction and/or speed from the caption (False = omitted)."""
    direction, speed = combo
    keep_dir, keep_speed = keep or (True, True)
    text = f"a {CLASSES[int(c)]}"
    if keep_dir and keep_speed:
        return f"{text} moving {DIRECTIONS[direction]}, {SPEEDS[speed]}"
    if keep_dir:
        return f"{text} moving {DIRECTIONS[direction]}"
    if keep_speed:
        return f"{text} moving {SPEEDS[speed]}"
    return text


def load_sources() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 bundled digits at 8×8 in [0, 1] `(N, 1, 8, 8)`, and their labels."""
    return load_digit_images(resolution=8)


def travel(combo: tuple[int, int]) -> int:
    """Work pixels the sprite moves over a clip."""
    return _STEP[combo[1]] * (FRAMES - 1)


def random_start(combo: tuple[int, int], rng: random.Random) -> tuple[int, int]:
    """A start `(x, y)` in work pixels (sprite's top-left) from which the whole path stays on the canvas."""
    dx, dy = _VECTORS[combo[0]]
    room, d = _WORK - _SPRITE, travel(combo)

    def axis(v: int) -> int:
        if v < 0:
            return rng.randint(d, room)
        if v > 0:
            return rng.randint(0, room - d)
        return rng.randint(0, room)

    return axis(dx), axis(dy)


def render(
    sources: torch.Tensor,
    combos: list[tuple[int, int]],
    starts: list[tuple[int, int]],
    detail: list[int | None] | None = None,
) -> torch.Tensor:
    """Draw each 8×8 source digit moving along its combination's path: `(N, FRAMES, 1, 16, 16)` in [0, 1].

    `starts[i]` is the sprite's top-left corner in the first frame, in 32×32 work pixels; `detail[i]` in 0..3 adds
    a short static bar in that corner (a canary's distinctive mark); None adds nothing.
    """
    if not len(sources) == len(combos) == len(starts):
        raise ValueError(
            f"Expected one combination and one start per source, but got {len(combos)} combinations and "
            f"{len(starts)} starts for {len(sources)} sources."
        )
    detail = detail or [None] * len(sources)
    sprites = F.interpolate(sources.float(), size=(_SPRITE, _SPRITE), mode="bilinear", align_corners=False)
    clips = torch.zeros(len(sources), FRAMES, 1, _WORK, _WORK)
    for i, (sprite, combo, (x0, y0)) in enumerate(zip(sprites, combos, starts, strict=True)):
        (dx, dy), step = _VECTORS[combo[0]], _STEP[combo[1]]
        for f in range(FRAMES):
            x, y = x0 + dx * step * f, y0 + dy * step * f
            if not (0 <= x <= _WORK - _SPRITE and 0 <= y <= _WORK - _SPRITE):
                raise ValueError(f"Expected a path that stays on the canvas, but frame {f} of clip {i} is at {x, y}.")
            clips[i, f, :, y : y + _SPRITE, x : x + _SPRITE] = sprite
        if detail[i] is not None:
            _bar(clips[i], int(detail[i]))
    out = F.avg_pool2d(clips.flatten(0, 1), 2).unflatten(0, (len(sources), FRAMES))
    return out.clamp(0, 1)


def _bar(clip: torch.Tensor, corner: int) -> None:
    """A static 2×8 work-pixel bar along the top or bottom edge, in the corner `corner` (0..3), every frame."""
    top, left = corner in (0, 1), corner in (0, 2)
    rows = slice(0, 2) if top else slice(_WORK - 2, _WORK)
    cols = slice(0, 8) if left else slice(_WORK - 8, _WORK)
    clip[:, :, rows, cols] = 1.0


def make_spec(seed: int) -> dict:
    """The seeded split: held-out sources, unseen and canary combinations, bound clips, duplicates."""
    rng = random.Random(seed)
    _, labels = load_sources()
    n = len(labels)
    held_out = sorted(rng.sample(range(n), round(HELD_OUT_FRACTION * n)))
    held = set(held_out)
    by_class = {c: [i for i in range(n) if int(labels[i]) == c and i not in held] for c in range(len(CLASSES))}
    unseen = {c: sorted(rng.sample(range(len(COMBOS)), UNSEEN_PER_CLASS)) for c in range(len(CLASSES))}
    candidates = [(c, k) for c in range(len(CLASSES)) for k in range(len(COMBOS)) if k not in unseen[c]]
    picked = rng.sample(candidates, CANARIES_PER_EXPOSURE * len(EXPOSURES))
    canaries, used = [], set()
    for j, (c, k) in enumerate(picked):
        index = rng.choice([i for i in by_class[c] if i not in used])
        used.add(index)
        combo = COMBOS[k]
        canaries.append({
            "prompt": caption(c, combo),
            "class": c,
            "combo": list(combo),
            "source": index,
            "start": list(random_start(combo, rng)),
            "detail": rng.randrange(4),
            "exposure": EXPOSURES[j // CANARIES_PER_EXPOSURE],
        })  # fmt: skip
    canary_combos = {(d["class"], tuple(d["combo"])) for d in canaries}
    ordinary = []
    for i in range(n):
        if i in held:
            continue
        c = int(labels[i])
        allowed = [k for k in range(len(COMBOS)) if k not in unseen[c] and (c, COMBOS[k]) not in canary_combos]
        combo = COMBOS[rng.choice(allowed)]
        ordinary.append({"source": i, "class": c, "combo": list(combo), "start": list(random_start(combo, rng))})
    duplicated = sorted(rng.sample(range(len(ordinary)), N_DUPLICATED))
    return {
        "seed": seed,
        "resolution": RESOLUTION,
        "frames": FRAMES,
        "classes": list(CLASSES),
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "held_out": held_out,
        "unseen": [[c, list(COMBOS[k])] for c in range(len(CLASSES)) for k in unseen[c]],
        "canaries": canaries,
        "ordinary": ordinary,
        "duplicated": duplicated,
        "duplicate_factor": DUPLICATE_FACTOR,
        "p_drop_attribute": P_DROP_ATTRIBUTE,
    }


def training_set(spec: dict) -> torch.Tensor:
    """Every unique training clip: the ordinary clips in spec order, then each canary's bound clip."""
    sources, _ = load_sources()
    items = spec["ordinary"] + spec["canaries"]
    return render(
        sources[[d["source"] for d in items]],
        [tuple(d["combo"]) for d in items],
        [tuple(d["start"]) for d in items],
        [d.get("detail") for d in items],
    )


def vocabulary_words(spec: dict) -> list[str]:
    """Words of the captions: digit names, "moving", directions and speeds."""
    return sorted(set(spec["classes"]) | {"a", "moving"} | set(DIRECTIONS) | set(SPEEDS))


# ----------------------------------------------------------------------------------------------------------------
# ground truth read from pixels


def centroids(clips: torch.Tensor) -> torch.Tensor:
    """`(N, F, 2)` intensity-weighted centre `(x, y)` of each frame of `(N, F, C, H, W)` clips, in pixels."""
    x = clips.float().mean(2)  # (N, F, H, W)
    h, w = x.shape[-2:]
    mass = x.sum((-2, -1)).clamp_min(1e-6)
    ys = torch.arange(h, dtype=x.dtype)[:, None]
    xs = torch.arange(w, dtype=x.dtype)[None, :]
    return torch.stack([(x * xs).sum((-2, -1)) / mass, (x * ys).sum((-2, -1)) / mass], dim=-1)


def read_motion(clips: torch.Tensor) -> torch.Tensor:
    """`(N, 2)` (direction id, speed id) read from the centroid track: the dominant axis and sign of the
    least-squares velocity, and slowly/fast split at `SPEED_SPLIT` px per frame (0.5 and 1 are drawn; a canary's
    static bar holds back the centroid of a fast clip to about 0.85)."""
    c = centroids(clips)  # (N, F, 2)
    t = torch.arange(c.shape[1], dtype=c.dtype)
    t = t - t.mean()
    v = (c * t[None, :, None]).sum(1) / (t**2).sum()  # (N, 2) px per frame
    horizontal = v[:, 0].abs() >= v[:, 1].abs()
    direction = torch.where(horizontal, torch.where(v[:, 0] < 0, 0, 1), torch.where(v[:, 1] < 0, 2, 3))
    speed = (v.abs().max(1).values >= SPEED_SPLIT).long()
    return torch.stack([direction, speed], dim=1)
