"""How a block map's lever acts: one validated, frozen config (in the style of diffusers' `LayerSkipConfig`).

    >>> config = LeverConfig(positive_gain=0.0, fidelity_guidance=0.2, pull_max=2.0, knob_scale=0.03)
    >>> config.to_dict()["pull_max"], LeverConfig.from_dict(config.to_dict()) == config
    (2.0, True)
    >>> LeverConfig(pull_max=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: Expected pull_max to be a finite number >= 0, but got -1.0.

A map keeps these settings in its `meta` (so every map file ever written loads as it did, and `probe` and the
calibrations write them there); `BlockMap.lever_config` reads them through this class, which checks them, and
`BlockMap.with_lever(...)` returns a map with some of them changed. The knob, `bake` and the controls read the
lever's behaviour only from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from memctl.attention_guidance import FIDELITY_MODES

__all__ = ["LeverConfig"]


@dataclass(frozen=True)
class LeverConfig:
    """The lever's gains, pull and scale.

    - `positive_gain`: fidelity > 0 acts this much (the residual lever; 0: not at all).
    - `fidelity_guidance`: condition lever, fidelity > 0: the gain of memorization guidance (one extra pass).
    - `attention_guidance`: the gain of in-attention guidance (`fidelity_mode="attention"`); None: `fidelity_guidance`.
    - `pull_max`: condition lever, fidelity -1 pulls memorized tokens this many times the way to the general ones.
    - `knob_scale`: what scores are divided by before the knob's law; None: the map's largest |score|.
    - `fidelity_mode`: "guidance" (extra pass), "cached" (its contrast reused for 10 steps) or "attention" (inside
      the cross-attention units); None: "guidance".
    - `per_prompt_gain`: the extra-pass modes take γ per prompt from the map's `meta["fidelity_guidance_curve"]`
      (`memctl.calibrate.gain_curve`) instead of `fidelity_guidance` for all. Off by default: it raised recall on
      digits and lowered ordinary validity and the most-exposed recall on digits-attr (bench/results/effect.md).
    """

    positive_gain: float = 1.0
    fidelity_guidance: float = 0.0
    attention_guidance: float | None = None
    pull_max: float = 1.0
    knob_scale: float | None = None
    fidelity_mode: str | None = None
    per_prompt_gain: bool = False

    def __post_init__(self):
        for name in ("positive_gain", "fidelity_guidance", "attention_guidance", "pull_max", "knob_scale"):
            value = getattr(self, name)
            if value is None and name in ("attention_guidance", "knob_scale"):
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or not (value > 0 if name == "knob_scale" else value >= 0):
                bound = "> 0 or None" if name == "knob_scale" else ">= 0"
                raise ValueError(f"Expected {name} to be a finite number {bound}, but got {value!r}.")
        if self.fidelity_mode is not None and self.fidelity_mode not in FIDELITY_MODES:
            raise ValueError(f"Expected fidelity_mode in {FIDELITY_MODES} or None, but got {self.fidelity_mode!r}.")
        if not isinstance(self.per_prompt_gain, bool):
            raise ValueError(f"Expected per_prompt_gain to be True or False, but got {self.per_prompt_gain!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeverConfig:
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise ValueError(f"Expected lever settings among {list(KEYS)}, but got unknown {unknown}.")
        return cls(**data)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> LeverConfig:
        """The settings a map's `meta` holds (other keys are the probe's summary); absent ones take the defaults.
        A `knob_scale` of 0 means none, as the knob has always read it."""
        found = {k: meta[k] for k in KEYS if meta.get(k) is not None}
        if found.get("knob_scale") == 0:
            del found["knob_scale"]
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        return cls(**{k: float(v) if k != "fidelity_mode" and number(v) else v for k, v in found.items()})


KEYS = tuple(f.name for f in fields(LeverConfig))
