"""The outputs of a job's shots and their names: the `name` pattern, one `Output` per seed and fidelity, grouped in
batches, and the checks that every name is a safe relative path distinct from the others (also on a
case-insensitive file system).

    >>> name_problem("seven/f+0.50_s3.png") is None, name_problem("../x.png")
    (True, "has the part '..'")
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from memctl.jobfile import got
from memctl.options import GenerationOptions, short_repr

if TYPE_CHECKING:
    from memctl.jobs import Shot

NAME_FIELDS = ("shot", "seed", "fidelity", "index", "strength", "steps", "guidance")
CALIBRATED = "calibrated"  # a shot's `window: calibrated` (composed extrapolation), until the renderer resolves it
DEFAULT_NAME = "{shot}/f{fidelity}_s{seed}"
MAX_OUTPUTS = 1_000_000
MAX_NAME = 240  # characters of an output name
_PART = re.compile(r"[A-Za-z0-9_+=,@-][A-Za-z0-9._+=,@-]*")


@dataclass(frozen=True)
class Output:
    """One file to render: its name under the output folder and its validated settings."""

    name: str  # posix path relative to the output folder, with extension
    shot: str
    options: GenerationOptions
    size: tuple[int, int] | None  # (width, height); None: the model's own

    @property
    def kind(self) -> str:
        return "mp4" if self.options.frames is not None else "png"

    def settings(self) -> dict:
        """The settings that determine the pixels (embedded in the file and hashed into the manifest key)."""
        return {**self.options.to_dict(), "size": list(self.size) if self.size else None}


def _pattern(raw: Any, where: str, errors: list[str]) -> str:
    expected = f"a relative name pattern using {{{'}, {'.join(NAME_FIELDS)}}} (no extension)"
    if not isinstance(raw, str) or not raw:
        errors.append(f"{where}, field `name`: Expected {expected}, but got {got(raw)}.")
        return DEFAULT_NAME
    if len(raw) > MAX_NAME:
        errors.append(
            f"{where}, field `name`: Expected {expected} of at most {MAX_NAME} characters, but got {short_repr(raw)}."
        )
        return DEFAULT_NAME
    try:
        parsed = [(f, spec) for _, f, spec, _ in string.Formatter().parse(raw) if f is not None]
    except ValueError as err:
        errors.append(f"{where}, field `name`: Expected {expected}, but got {raw!r} ({err}).")
        return DEFAULT_NAME
    bad = [f for f, _ in parsed if f not in NAME_FIELDS]
    wide = [f"{{{f}:{spec}}}" for f, spec in parsed if any(int(n) > MAX_NAME for n in re.findall(r"\d+", spec or ""))]
    nested = [f"{{{f}:{spec}}}" for f, spec in parsed if "{" in (spec or "")]
    if bad:
        errors.append(f"{where}, field `name`: Expected {expected}, but got unknown placeholder(s) {bad} in {raw!r}.")
    elif wide or nested:
        errors.append(
            f"{where}, field `name`: Expected format specs with widths and precisions of at most "
            f"{MAX_NAME} (a name has at most {MAX_NAME} characters) and no nested placeholders, but got "
            f"{(wide or nested)[0]!r}."
        )
    elif raw.lower().endswith((".png", ".mp4")):
        errors.append(
            f"{where}, field `name`: Expected a pattern without extension (.png or .mp4 is added), but got {raw!r}."
        )
    return raw


def _shot_batches(shot: Shot, batch_size: int):
    v = shot.values
    for fid in v["fidelity"]:
        outputs = [_output(shot, j, seed, fid, batch_size) for j, seed in enumerate(v["seeds"])]
        for k in range(0, len(outputs), batch_size):
            yield outputs[k : k + batch_size]


def _output(shot: Shot, index: int, seed: int, fid: float, batch_size: int) -> Output:
    v = shot.values
    if v["window"] == CALIBRATED:
        raise ValueError(
            f"Expected {shot.where()}'s window as [start, stop], but it is still '{CALIBRATED}': the renderer "
            "calibrates it once the model is loaded (memctl.renderer.Renderer(job).job has it resolved)."
        )
    opts = GenerationOptions(
        prompt=v["prompt"], negative_prompt=v["negative_prompt"], seed=seed, steps=v["steps"], guidance=v["guidance"],
        fidelity=fid, strength=v["strength"], start=v["window"][0], stop=v["window"][1], batch_size=batch_size,
        frames=v["frames"],
        fps=(v["fps"] or 8) if v["frames"] is not None else None, fidelity_mode=v.get("fidelity_mode"),
        extrapolation=v.get("extrapolation"),
    )  # fmt: skip
    fields = {
        "shot": shot.id,
        "seed": seed,
        "fidelity": _fid_text(fid),
        "index": index,
        "strength": v["strength"],
        "steps": v["steps"],
        "guidance": v["guidance"],
    }
    name = v["name"].format(**fields) + (".mp4" if v["frames"] is not None else ".png")
    return Output(name=name, shot=shot.id, options=opts, size=v["size"])


def _fid_text(f: float) -> str:
    text = f"{f:+.2f}"
    return text if float(text) == f else f"{f:+.6g}"


def _check_names(shots: list[Shot], errors: list[str]) -> None:
    """Names must be safe relative paths (no '..', no leading '.', no '/' at the start) and distinct."""
    owner: dict[str, str] = {}
    total = [0]
    for shot in shots:
        if shot.values.get("window") == CALIBRATED:  # names do not depend on the window: any stands in for it
            shot = replace(shot, values={**shot.values, "window": (0.0, 1.0)})
        try:
            if not _check_shot_names(shot, owner, total, errors):
                return
        except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as err:
            errors.append(
                f"{shot.where()}, field `name`: Expected a pattern whose format specs fit its fields "
                f"(seed, index, steps: int; strength, guidance: number; shot, fidelity: text), but "
                f"{shot.values['name']!r} failed: {type(err).__name__}: {str(err)[:200]}"
            )


def _check_shot_names(shot: Shot, owner: dict[str, str], total: list[int], errors: list[str]) -> bool:
    """False (with an error) at the first bad name of `shot`; `owner` maps names so far to shots."""
    for out in (o for b in _shot_batches(shot, 1) for o in b):
        total[0] += 1
        if total[0] > MAX_OUTPUTS:
            errors.append(f"job: Expected at most {MAX_OUTPUTS} outputs, but the shots make more.")
            return False
        problem = name_problem(out.name)
        if problem:
            errors.append(
                f"{shot.where()}, field `name`: Expected a name inside the output folder, made of "
                f"letters, digits and ._+=,@- in '/'-separated parts not starting with '.', but "
                f"{shot.values['name']!r} gives {short_repr(out.name, 260)} ({problem})."
            )
            return False
        key = out.name.lower()  # case-insensitive file systems would merge these
        if key in owner:
            errors.append(
                f"{shot.where()}, field `name`: Expected a distinct name per output, but {out.name!r} "
                f"is also made by {owner[key]}. Add {{seed}} and {{fidelity}} to the pattern."
            )
            return False
        owner[key] = shot.where()
    return True


def name_problem(name: str) -> str | None:
    """Why `name` is not a safe relative output path, or None."""
    if len(name) > 240:
        return "longer than 240 characters"
    if name.startswith("/") or "\\" in name:
        return "absolute or with a backslash"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return f"has the part {part!r}"
        if not _PART.fullmatch(part):
            return f"the part {part!r} has a character outside letters, digits and ._+=,@- or starts with '.'"
    return None
