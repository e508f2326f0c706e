"""Job files for `memctl render`: one schema in YAML or JSON, validated whole before any work starts.

>>> job = parse_job({"model": "digits", "shots": [{"id": "seven", "prompt": "a seven", "seeds": [0, 1]}]})
>>> [o.name for o in job.outputs()]
['seven/f+0.00_s0.png', 'seven/f+0.00_s1.png']

Every error names where it is (`shots[2] (id 'rain')`), the field, what was expected and what came; all of a
file's errors are reported together. Unknown fields are errors. Names cannot leave the output folder.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memctl.job_outputs import (
    CALIBRATED,
    DEFAULT_NAME,
    MAX_NAME,
    MAX_OUTPUTS,
    NAME_FIELDS,
    Output,
    _check_names,
    _pattern,
    _shot_batches,
    name_problem,
)
from memctl.jobfile import got, parse_json, parse_yaml
from memctl.options import GenerationOptions, needs_map, short_repr

__all__ = [
    "CALIBRATED", "DEFAULT_NAME", "DTYPES", "JOB_FIELDS", "MAX_NAME", "MAX_OUTPUTS", "NAME_FIELDS", "SHOT_FIELDS",
    "Job", "JobError", "Output", "Shot", "load_job", "name_problem", "parse_job",
]  # fmt: skip

SHOT_FIELDS = (
    "prompt",
    "negative_prompt",
    "seeds",
    "fidelity",
    "strength",
    "window",
    "steps",
    "guidance",
    "size",
    "frames",
    "fps",
    "fidelity_mode",
    "extrapolation",
    "name",
)
JOB_FIELDS = ("version", "model", "block_map", "dtype", "batch_size", "cpu_threads", "guard", "guard_fidelity",
              "bake", "bake_prompts", "defaults", "shots")  # fmt: skip
DTYPES = ("float32", "float16", "bfloat16")
MAX_PROMPT_CHARS = 10_000  # far above any text encoder's reach; the renderer checks the model's own token limit
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class JobError(ValueError):
    """A job file that cannot run; `.errors` lists every problem found, each naming shot, field, expected, got."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source} is not a valid job ({len(self.errors)} error(s)); nothing was rendered:\n{lines}")


@dataclass(frozen=True)
class Shot:
    id: str
    index: int
    values: dict  # validated shot fields, defaults applied; "seeds" and "fidelity" are tuples

    def where(self) -> str:
        return f"shots[{self.index}] (id {self.id!r})"


@dataclass(frozen=True)
class Job:
    """A validated job: `outputs()` lists every file in a fixed order, `batches()` groups them for sampling."""

    source: str
    model: str
    block_map: str | None = None
    dtype: str = "float32"
    batch_size: int = 1
    cpu_threads: int | None = None
    guard: str | None = None  # "detect": prompts `memctl.signals.screen` flags render at `guard_fidelity`
    guard_fidelity: float = -1.0
    bake: bool = False  # also save a baked copy (memctl.bake) of the model per fidelity < 0 and strength rendered
    bake_prompts: str | None = None  # text file of memorized prompts the bake's key/value edit is fit on
    shots: tuple[Shot, ...] = field(default=())
    base: Path = Path(".")  # relative model and map paths are read from here (the job file's folder)

    def outputs(self) -> list[Output]:
        return [o for batch in self.batches() for o in batch]

    def batches(self) -> list[tuple[Output, ...]]:
        """Outputs grouped as they are sampled: one shot and fidelity, consecutive seeds, `batch_size` at most.

        The grouping depends on the job alone, so a resumed or multi-process run samples the same batches
        (results on CPU change in the last float bits with the batch's composition)."""
        return [tuple(b) for shot in self.shots for b in _shot_batches(shot, self.batch_size)]

    def bake_settings(self) -> list[tuple[float, float]]:
        """(fidelity, strength) of each baked copy `bake: true` saves: every fidelity below 0 a shot renders at
        (and `guard_fidelity` with a guard), with that shot's strength; none without `bake`."""
        if not self.bake:
            return []
        pairs = {(float(f), float(s.values["strength"])) for s in self.shots for f in s.values["fidelity"] if f < 0}
        if self.guard is not None and self.guard_fidelity < 0:
            pairs |= {(float(self.guard_fidelity), float(s.values["strength"])) for s in self.shots}
        return sorted(pairs)


def load_job(path: str | Path) -> Job:
    """Read and validate a job file (`.yaml`, `.yml` or `.json`); raises `JobError` listing every problem."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise JobError(str(path), [f"Expected a job file ending in .yaml, .yml or .json, but got {path.name!r}."])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise JobError(str(path), [f"Expected a readable UTF-8 job file, but reading failed: {err}"]) from None
    try:
        data = parse_json(text) if path.suffix.lower() == ".json" else parse_yaml(text)
    except (ValueError, yaml.YAMLError) as err:
        raise JobError(str(path), [f"Expected valid {path.suffix[1:].upper()}, but parsing failed: {err}"]) from None
    return parse_job(data, source=str(path), base=path.resolve().parent)


def parse_job(data: Any, source: str = "<job>", base: Path = Path(".")) -> Job:
    """Validate a job given as a dict (the parsed file)."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise JobError(source, [f"Expected a mapping with {list(JOB_FIELDS)} at the top, but got {got(data)}."])
    _unknown("job", data, JOB_FIELDS, errors)
    top = _top_fields(data, errors)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        errors.append(f"job, field `defaults`: Expected a mapping of shot fields, but got {got(defaults)}.")
        defaults = {}
    _unknown("defaults", defaults, SHOT_FIELDS, errors)
    shots = _shots(data.get("shots"), defaults, top, errors)
    if not errors:
        _check_names(shots, errors)
        _check_bake(top, shots, errors)
    if errors:
        raise JobError(source, errors)
    return Job(source=source, shots=tuple(shots), base=base, **top)


def _check_bake(top: dict, shots: list[Shot], errors: list[str]) -> None:
    """`bake: true` needs a block map and a fidelity below 0 to bake; a baked copy acts at every noise level, so a
    shot it covers cannot have a narrower `window`."""
    if not top["bake"]:
        if top["bake_prompts"] is not None:
            errors.append("job, field `bake_prompts`: Expected it only with `bake: true`, but got no bake.")
        return
    if top["block_map"] is None:
        errors.append("job, field `bake`: Expected a job with a `block_map` (the map is baked), but got no block_map.")
        return
    composed = [s.where() for s in shots if s.values.get("extrapolation") == "composed"]
    if composed:
        errors.append(
            f"{composed[0]}, field `extrapolation`: Expected the map's lever with `bake: true` (composed "
            f"extrapolation runs extra denoiser passes; it has no weights to bake), but got 'composed'. Leave out one."
        )
    fids = sorted({f for s in shots for f in s.values["fidelity"]})
    guarded = top["guard"] is not None and top["guard_fidelity"] < 0
    if not guarded and not any(f < 0 for f in fids):
        errors.append(
            f"job, field `bake`: Expected a shot (or guard_fidelity) with a fidelity below 0 to bake (fidelity > 0 is "
            f"guidance, an extra pass per step, not a weight edit; 0 is the model itself), but got fidelities {fids}."
        )
    for s in shots:
        if s.values["window"] == CALIBRATED:  # composed only: refused above
            continue
        window = tuple(s.values["window"])
        if window != (0.0, 1.0) and (guarded or any(f < 0 for f in s.values["fidelity"])):
            errors.append(
                f"{s.where()}, field `window`: Expected [0, 1] with `bake: true` (a baked copy acts at every noise "
                f"level), but got {list(window)}. Leave out the window or the bake."
            )


def _top_fields(data: dict, errors: list[str]) -> dict:
    def check(name: str, ok, expected: str, default):
        value = data.get(name, default)
        if not ok(value):
            errors.append(f"job, field `{name}`: Expected {expected}, but got {got(value)}.")
            return default
        return value

    check("version", lambda v: v == 1, "1 (the only schema version)", 1)
    if "model" not in data:
        errors.append("job, field `model`: Expected a testbed name, pipeline folder or hub id, but got nothing.")
    top = {
        "model": check("model", lambda v: isinstance(v, str) and v.strip(), "a non-empty str", ""),
        "block_map": check(
            "block_map",
            lambda v: v is None or (isinstance(v, str) and v.strip()),
            "a path to a block map (.safetensors), 'shipped', or null",
            None,
        ),
        "dtype": check("dtype", lambda v: v in DTYPES, f"one of {list(DTYPES)}", "float32"),
        "batch_size": check("batch_size", lambda v: _is_int(v) and 1 <= v <= 64, "an int in [1, 64]", 1),
        "cpu_threads": check(
            "cpu_threads", lambda v: v is None or (_is_int(v) and 1 <= v <= 1024), "null or an int in [1, 1024]", None
        ),
        "guard": check("guard", lambda v: v in (None, "detect"), "null or 'detect'", None),
        "guard_fidelity": check(
            "guard_fidelity",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and -1 <= v <= 1,
            "a number in [-1, 1]",
            -1.0,
        ),
    }
    top["bake"] = check("bake", lambda v: isinstance(v, bool), "true or false", False)
    top["bake_prompts"] = check(
        "bake_prompts",
        lambda v: v is None or (isinstance(v, str) and v.strip()),
        "null or a path to a text file of memorized prompts, one per line",
        None,
    )
    if top["guard"] is not None and top["block_map"] is None:
        errors.append("job, field `guard`: Expected a job with a `block_map` (the guard renders flagged prompts at "
                      "`guard_fidelity`), but got no block_map.")  # fmt: skip
    return top


def _shots(raw: Any, defaults: dict, top: dict, errors: list[str]) -> list[Shot]:
    if not isinstance(raw, list) or not raw:
        errors.append(f"job, field `shots`: Expected a non-empty list of shots, but got {got(raw)}.")
        return []
    shots, seen = [], {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            errors.append(f"shots[{i}]: Expected a mapping with `id`, `prompt` and `seeds`, but got {got(item)}.")
            continue
        sid = item.get("id")
        where = f"shots[{i}]" + (f" (id {short_repr(sid, 70)})" if isinstance(sid, str) else "")
        if not (isinstance(sid, str) and _ID.fullmatch(sid)):
            errors.append(
                f"{where}, field `id`: Expected a name of letters, digits, '_' or '-' (at most 64, "
                f"starting with a letter or digit), but got {got(sid) if 'id' in item else 'nothing'}."
            )
        elif sid in seen:
            errors.append(
                f"{where}, field `id`: Expected an id not used by another shot, but shots[{seen[sid]}] has it too."
            )
        else:
            seen[sid] = i
        n = len(errors)
        _unknown(where, item, ("id", *SHOT_FIELDS), errors)
        values = _shot_values({**defaults, **{k: v for k, v in item.items() if k != "id"}}, where, errors)
        composed = bool(values) and values.get("extrapolation") == "composed"
        mapped = [f for f in values["fidelity"] if needs_map(f, values["extrapolation"])] if values else []
        if values and top["block_map"] is None and mapped:
            errors.append(
                f"{where}, field `fidelity`: Expected 0 when the job has no `block_map`"
                f"{' (or below 0 with extrapolation: composed)' if composed else ''}, but got "
                f"{list(values['fidelity'])}. Add `block_map:` to the job, or set fidelity to 0."
            )
        if composed:
            _check_composed(values, where, errors)
        if len(errors) == n and isinstance(sid, str):
            shots.append(Shot(sid, i, values))
    return shots


def _check_composed(values: dict, where: str, errors: list[str]) -> None:
    """`extrapolation: composed` acts at fidelity < 0 with no map and no strength (its `window` bounds the noise
    levels where it acts): a shot with no fidelity above 0 (where the map's knob acts) must leave the strength at its
    default, else it would be ignored."""
    if any(f > 0 for f in values["fidelity"]) or values["strength"] == 1.0:
        return
    errors.append(
        f"{where}, field `strength`: Expected 1.0 with extrapolation: composed and no fidelity above 0 (composed "
        f"extrapolation has no strength), but got {values['strength']!r}."
    )


def _shot_values(merged: dict, where: str, errors: list[str]) -> dict:
    """Check each shot field on its own (so all problems are reported), with `GenerationOptions` ranges."""
    n = len(errors)
    for name in ("prompt", "seeds"):
        if name not in merged:
            errors.append(f"{where}, field `{name}`: Expected it (in the shot or in `defaults`), but got nothing.")
    v: dict[str, Any] = {}
    v["prompt"] = _option(merged, "prompt", where, errors, None)
    v["negative_prompt"] = _option(merged, "negative_prompt", where, errors, "")
    for name in ("prompt", "negative_prompt"):
        if isinstance(v[name], str) and len(v[name]) > MAX_PROMPT_CHARS:
            errors.append(
                f"{where}, field `{name}`: Expected at most {MAX_PROMPT_CHARS} characters, but got "
                f"{short_repr(v[name])}."
            )
    for name in ("strength", "steps", "guidance", "frames", "fps", "fidelity_mode", "extrapolation"):
        v[name] = _option(merged, name, where, errors, getattr(GenerationOptions, name))
    v["seeds"] = _seeds(merged["seeds"], where, errors) if "seeds" in merged else ()  # missing: reported above
    v["fidelity"] = _fidelities(merged.get("fidelity", 0.0), where, errors)
    v["window"] = _window(merged.get("window", [0.0, 1.0]), where, errors)
    if v["window"] == CALIBRATED and v["extrapolation"] != "composed":
        errors.append(
            f"{where}, field `window`: Expected '{CALIBRATED}' only with extrapolation: composed (the window is "
            f"calibrated for composed extrapolation), but got extrapolation {v['extrapolation']!r}. Give [start, "
            "stop]."
        )
    v["size"] = _size(merged.get("size"), where, errors)
    v["name"] = _pattern(merged.get("name", DEFAULT_NAME), where, errors)
    if v["fps"] is not None and v["frames"] is None:
        errors.append(f"{where}, field `fps`: Expected it only with `frames` (a video shot), but got {v['fps']!r}.")
    return v if len(errors) == n else {}


def _option(merged: dict, name: str, where: str, errors: list[str], default):
    if name not in merged and default is None and name == "prompt":
        return None  # reported as missing
    value = merged.get(name, default)
    try:
        GenerationOptions(**{"prompt": "", name: value})
    except (ValueError, TypeError) as err:
        errors.append(f"{where}, field `{name}`: {err}")
    return value


def _seeds(raw: Any, where: str, errors: list[str]) -> tuple[int, ...]:
    expected = "a list of distinct ints in [0, 2**63), or {start: int, count: int}"
    if isinstance(raw, dict):
        if (
            set(raw) != {"start", "count"}
            or not (_is_int(raw["start"]) and _is_int(raw["count"]))
            or not 1 <= raw["count"] <= MAX_OUTPUTS
        ):
            errors.append(
                f"{where}, field `seeds`: Expected {expected} with count in [1, {MAX_OUTPUTS}], but got {got(raw)}."
            )
            return ()
        raw = list(range(raw["start"], raw["start"] + raw["count"]))
    if not isinstance(raw, list) or not raw or not all(_is_int(s) and 0 <= s < 2**63 for s in raw):
        errors.append(f"{where}, field `seeds`: Expected {expected}, but got {got(raw)}.")
        return ()
    if len(set(raw)) != len(raw):
        dup = sorted(s for s, n in Counter(raw).items() if n > 1)
        errors.append(f"{where}, field `seeds`: Expected distinct seeds, but got {short_repr(dup)} more than once.")
        return ()
    return tuple(raw)


def _fidelities(raw: Any, where: str, errors: list[str]) -> tuple[float, ...]:
    expected = "a number in [-1, 1], a list of them, or a sweep {from: x, to: y, count: n}"
    if isinstance(raw, dict):
        ok = (
            set(raw) == {"from", "to", "count"}
            and _is_int(raw["count"])
            and 1 <= raw["count"] <= 1001
            and all(_is_num(raw[k]) and -1 <= raw[k] <= 1 for k in ("from", "to"))
        )
        if not ok:
            errors.append(f"{where}, field `fidelity`: Expected {expected} (count in [1, 1001]), but got {got(raw)}.")
            return ()
        a, b, n = float(raw["from"]), float(raw["to"]), raw["count"]
        raw = [a] if n == 1 else [round(a + (b - a) * i / (n - 1), 6) + 0.0 for i in range(n)]
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(_is_num(f) and -1 <= f <= 1 for f in values):
        errors.append(f"{where}, field `fidelity`: Expected {expected}, but got {got(raw)}.")
        return ()
    values = [float(f) + 0.0 for f in values]  # + 0.0 turns -0.0 into 0.0
    if len(set(values)) != len(values):
        errors.append(f"{where}, field `fidelity`: Expected distinct values, but got {got(raw)}.")
        return ()
    return tuple(values)


def _window(raw: Any, where: str, errors: list[str]) -> tuple[float, float] | str:
    if raw == CALIBRATED:  # resolved by the renderer once the model is loaded (composed extrapolation only)
        return CALIBRATED
    if not (isinstance(raw, list) and len(raw) == 2 and all(_is_num(x) for x in raw)):
        errors.append(
            f"{where}, field `window`: Expected [start, stop] with 0 <= start <= stop <= 1 (the part of "
            f"the noise schedule where the knob acts) or '{CALIBRATED}' (with extrapolation: composed), but got "
            f"{got(raw)}."
        )
        return (0.0, 1.0)
    try:
        GenerationOptions(prompt="", start=raw[0], stop=raw[1])
    except ValueError as err:
        errors.append(f"{where}, field `window`: {err}")
    return (float(raw[0]), float(raw[1]))


def _size(raw: Any, where: str, errors: list[str]) -> tuple[int, int] | None:
    if raw is None:
        return None
    pair = [raw, raw] if _is_int(raw) else raw
    if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(x) and 1 <= x <= 16384 for x in pair)):
        errors.append(
            f"{where}, field `size`: Expected null (the model's size), an int, or [width, height] of ints "
            f"in [1, 16384], but got {got(raw)}."
        )
        return None
    return (pair[0], pair[1])


def _unknown(where: str, d: dict, known: tuple[str, ...], errors: list[str]) -> None:
    for key in d:
        if key not in known:
            name = str(key)[:80] + ("…" if len(str(key)) > 80 else "")
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            errors.append(f"{where}, field `{name}`: Expected one of {list(known)}, but got this unknown field.{hint}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")
