"""The app's control values: the twelve inputs that every sampling button and presets share, as one `Controls`,
validated into `GenerationOptions` within the app's `LIMITS`.

    >>> opts = Controls("a seven", "", 0.5, 1.0, 0.0, 1.0, 7, 10, 1.0, 2).options()
    >>> opts.prompt, opts.fidelity, opts.seed, opts.batch_size
    ('a seven', 0.5, 7, 2)

Gradio calls a handler with its inputs in order and names the handler's API parameters after its signature, so a
handler taking `Controls` is served with the flat signature by `takes_controls`.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import gradio as gr

from memctl.attention_guidance import DEFAULT_FIDELITY_MODE
from memctl.options import GenerationOptions, short_repr

__all__ = ["Controls", "LIMITS", "MAX_PROMPT", "RANDOM_SEED", "small_upload", "takes_controls", "user_errors"]

RANDOM_SEED = -1
# The app's ranges (its sliders stop here; the server holds requests to them too: one request holds the engine's
# lock, so `GenerationOptions`' wider ranges, meant for batch renders, would let one client stall everyone).
LIMITS = {"steps": (1, 100), "batch_size": (1, 16), "guidance": (0, 20), "frames": (1, 64), "fps": (1, 60)}
MAX_PROMPT = 2000  # characters: far past any text encoder's reach, and no megabyte messages back


@dataclass(frozen=True)
class Controls:
    """The raw values of the app's generation controls, in the order of its inputs (and of a preset's values)."""

    prompt: Any
    negative: Any
    fidelity: Any
    strength: Any
    start: Any
    stop: Any
    seed: Any
    steps: Any
    guidance: Any
    batch: Any
    frames: Any = None
    fps: Any = None
    fidelity_mode: Any = None  # how fidelity > 0 is computed (memctl.apply_knob); None: the map's, else cached
    extrapolation: Any = None  # how fidelity < 0 acts: "map" (the map's pull) or "composed" (memctl.composed)

    @classmethod
    def showing(cls, o: GenerationOptions, frames: int, fps: int) -> Controls:
        """The controls that show `o` (`frames` and `fps` where it has none: an image model's options)."""
        return cls(
            o.prompt,
            o.negative_prompt,
            o.fidelity,
            o.strength,
            o.start,
            o.stop,
            o.seed,
            o.steps,
            o.guidance,
            o.batch_size,
            o.frames or frames,
            o.fps or fps,
            o.fidelity_mode or DEFAULT_FIDELITY_MODE,
            o.extrapolation or "map",
        )

    def values(self) -> list:
        return list(astuple(self))

    def options(self, video: bool = False) -> GenerationOptions:
        """Validated options within `LIMITS`; seed -1 (or empty) draws a random seed; frames and fps only for video."""
        for name, text in (("prompt", self.prompt), ("negative_prompt", self.negative)):
            if isinstance(text, str) and len(text) > MAX_PROMPT:
                raise ValueError(f"Expected `{name}` of at most {MAX_PROMPT} characters, but got {short_repr(text)}.")
        opts = GenerationOptions(
            prompt=self.prompt if isinstance(self.prompt, str) else fail("prompt", "a str", self.prompt),
            negative_prompt=self.negative or "",
            seed=seed_value(self.seed),
            steps=integer(self.steps, "steps"),
            guidance=_number(self.guidance),
            fidelity=_number(self.fidelity),
            strength=_number(self.strength),
            start=_number(self.start),
            stop=_number(self.stop),
            batch_size=integer(self.batch, "batch_size"),
            frames=integer(self.frames, "frames") if video and self.frames is not None else None,
            fps=integer(self.fps, "fps") if video and self.fps is not None else None,
            fidelity_mode=self.fidelity_mode or None,
            extrapolation=None if self.extrapolation in (None, "", "map") else self.extrapolation,
        )
        for name, (low, high) in LIMITS.items():
            value = getattr(opts, name)
            if value is not None and not low <= value <= high:
                raise ValueError(
                    f"Expected `{name}` in [{low}, {high}] (the app's range; `memctl render` takes "
                    f"more), but got {value!r}."
                )
        return opts


FIELDS = tuple(f.name for f in fields(Controls))


def takes_controls(*extra: str):
    """Serve `method(self, controls, *extra)` as `method(self, prompt, negative, ..., fps, *extra)`, the flat
    signature Gradio calls positionally and names the API's parameters after."""
    params = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in ("self", *FIELDS, *extra)]
    signature = inspect.Signature(params)

    def wrap(method):
        @functools.wraps(method)
        def flat(*args, **kwargs):
            self, *values = signature.bind(*args, **kwargs).args
            return method(self, Controls(*values[: len(FIELDS)]), *values[len(FIELDS) :])

        flat.__signature__ = signature
        return flat

    return wrap


def fail(field, expected, got):
    raise ValueError(f"Expected `{field}` to be {expected}, but got {got!r}.")


def is_random(seed) -> bool:
    return seed is None or (isinstance(seed, str) and not seed.strip()) or seed == RANDOM_SEED


def seed_value(seed) -> int:
    if is_random(seed):
        return random.SystemRandom().randrange(2**32)
    return integer(seed, "seed", "an int in [0, 2**63), or -1 for a random seed")


def integer(x, field, expected="an int"):
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            fail(field, expected, x)
    if isinstance(x, float) and math.isfinite(x) and x == int(x):
        return int(x)
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    fail(field, expected, x)


def _number(x):
    return float(x) if isinstance(x, str) and x.strip() else x


def user_errors(fn):
    """Report bad input as a `gr.Error` naming what was expected (the app stays up)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
            raise gr.Error(str(err).strip("'\""), print_exception=False) from err

    return wrapper


def path_of(file) -> str:
    return file if isinstance(file, str) else getattr(file, "name", None) or file["path"]


def small_upload(file, limit: int, what: str) -> str:
    """The uploaded file's path, if it is a file of at most `limit` bytes."""
    path = Path(path_of(file))
    if not path.is_file():
        raise ValueError(f"Expected {what}, but {path.name!r} is not a file.")
    size = path.stat().st_size
    if size > limit:
        raise ValueError(
            f"Expected {what} of at most {limit // 2**20} MB, but {path.name!r} has {size / 2**20:.1f} MB."
        )
    return str(path)
