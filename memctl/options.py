"""`GenerationOptions`: the settings of one generation, shared by the Python API, the CLI, the app and job files.

>>> opts = GenerationOptions(prompt="a seven", seed=3, fidelity=-0.5)
>>> GenerationOptions.from_dict(opts.to_dict()) == opts
True
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass, fields

EXTRAPOLATIONS = (None, "composed")  # how fidelity < 0 acts: the map's lever, or memctl.composed


def needs_map(fidelity: float, extrapolation: str | None) -> bool:
    """Whether sampling at `fidelity` needs a block map: above 0 always, below 0 unless composed (which has none)."""
    return fidelity > 0 or (fidelity < 0 and extrapolation != "composed")


@dataclass(frozen=True)
class GenerationOptions:
    """Validated settings of one generation; `to_dict`/`from_dict` round-trip through JSON."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 1.0
    fidelity: float = 0.0
    strength: float = 1.0
    start: float = 0.0
    stop: float = 1.0
    batch_size: int = 1
    frames: int | None = None
    fps: int | None = None
    fidelity_mode: str | None = None  # fidelity > 0: "cached", "guidance", "attention" (None: the map's, else cached)
    extrapolation: str | None = None  # fidelity < 0: "composed" (memctl.composed, no map); None: the map's lever

    def __post_init__(self):
        _expect(isinstance(self.prompt, str), "prompt", "a str", self.prompt)
        _expect(isinstance(self.negative_prompt, str), "negative_prompt", "a str", self.negative_prompt)
        _expect(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", "an int in [0, 2**63)", self.seed)
        _expect(_is_int(self.steps) and 1 <= self.steps <= 1000, "steps", "an int in [1, 1000]", self.steps)
        _expect(
            _is_int(self.batch_size) and 1 <= self.batch_size <= 64, "batch_size", "an int in [1, 64]", self.batch_size
        )
        _expect(_finite(self.guidance) and 0 <= self.guidance <= 50, "guidance", "a number in [0, 50]", self.guidance)
        _expect(_finite(self.fidelity) and -1 <= self.fidelity <= 1, "fidelity", "a number in [-1, 1]", self.fidelity)
        _expect(_finite(self.strength) and 0 <= self.strength <= 4, "strength", "a number in [0, 4]", self.strength)
        _expect(_finite(self.start) and 0 <= self.start <= 1, "start", "a number in [0, 1]", self.start)
        _expect(
            _finite(self.stop) and self.start <= self.stop <= 1,
            "stop",
            f"a number in [start={self.start}, 1]",
            self.stop,
        )
        for name in ("frames", "fps"):
            value = getattr(self, name)
            _expect(value is None or (_is_int(value) and value >= 1), name, "None or a positive int", value)
        from memctl.attention_guidance import FIDELITY_MODES

        _expect(
            self.fidelity_mode is None or self.fidelity_mode in FIDELITY_MODES,
            "fidelity_mode",
            f"None or one of {FIDELITY_MODES}",
            self.fidelity_mode,
        )
        _expect(self.extrapolation in EXTRAPOLATIONS, "extrapolation", f"one of {EXTRAPOLATIONS}", self.extrapolation)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GenerationOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Expected only the fields {sorted(known)}, but got unknown field(s) {unknown}.")
        return cls(**d)

    def a1111_parameters(self, model: str = "", block_map: str = "") -> str:
        """The A1111-style `parameters` text: prompt, `Negative prompt:`, then `Key: value` pairs."""
        pairs = [
            ("Steps", self.steps),
            ("Sampler", "DDIM"),
            ("CFG scale", self.guidance),
            ("Seed", self.seed),
            ("Fidelity", self.fidelity),
            ("Fidelity strength", self.strength),
            ("Fidelity window", f"{self.start}-{self.stop}"),
        ]
        if self.fidelity_mode is not None:
            pairs.append(("Fidelity mode", self.fidelity_mode))
        if self.extrapolation is not None:
            pairs.append(("Extrapolation", self.extrapolation))
        if model:
            pairs.append(("Model", model))
        if block_map:
            pairs.append(("Block map", block_map))
        text = self.prompt + (f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else "")
        return text + "\n" + ", ".join(f"{k}: {v}" for k, v in pairs)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def short_repr(value, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters without building the whole repr (a 1 MB prompt, a deep list).

    >>> short_repr("x" * 10**6, 12)
    "'xxxxxxxxxx…' (1000000 characters)"
    """
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlevel = limit, limit, 3
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 8
    if isinstance(value, str) and len(value) > limit:
        text = repr(value[: max(limit - 2, 1)])
        return f"{text[:-1]}…{text[-1]} ({len(value)} characters)"
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _expect(ok: bool, field: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"Expected `{field}` to be {expected}, but got {short_repr(got)}.")
