"""Job files for `memctl render`: one schema in YAML or JSON, validated whole before any work starts.

>>> job = parse_job({"model": "digits", "shots": [{"id": "seven", "prompt": "a seven", "seeds": [0, 1]}]})
>>> [o.name for o in job.outputs()]
['seven/f+0.00_s0.png', 'seven/f+0.00_s1.png']

Every error names where it is (`shots[2] (id 'rain')`), the field, what was expected and what came; all of a
file's errors are reported together. Unknown fields are errors. Names cannot leave the output folder.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memctl.options import GenerationOptions, short_repr

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
    "name",
)
JOB_FIELDS = ("version", "model", "block_map", "dtype", "batch_size", "cpu_threads", "guard", "guard_fidelity",
              "defaults", "shots")  # fmt: skip
DTYPES = ("float32", "float16", "bfloat16")
NAME_FIELDS = ("shot", "seed", "fidelity", "index", "strength", "steps", "guidance")
DEFAULT_NAME = "{shot}/f{fidelity}_s{seed}"
MAX_OUTPUTS = 1_000_000
MAX_PROMPT_CHARS = 10_000  # far above any text encoder's reach; the renderer checks the model's own token limit
MAX_NAME = 240  # characters of an output name
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_PART = re.compile(r"[A-Za-z0-9_+=,@-][A-Za-z0-9._+=,@-]*")


class JobError(ValueError):
    """A job file that cannot run; `.errors` lists every problem found, each naming shot, field, expected, got."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source} is not a valid job ({len(self.errors)} error(s)); nothing was rendered:\n{lines}")


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
    shots: tuple[Shot, ...] = field(default=())
    base: Path = Path(".")  # relative model and map paths are read from here (the job file's folder)

    def outputs(self) -> list[Output]:
        return [o for batch in self.batches() for o in batch]

    def batches(self) -> list[tuple[Output, ...]]:
        """Outputs grouped as they are sampled: one shot and fidelity, consecutive seeds, `batch_size` at most.

        The grouping depends on the job alone, so a resumed or multi-process run samples the same batches
        (results on CPU change in the last float bits with the batch's composition)."""
        return [tuple(b) for shot in self.shots for b in _shot_batches(shot, self.batch_size)]


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
        data = _parse_json(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_StrictLoader)
    except (ValueError, yaml.YAMLError) as err:
        raise JobError(str(path), [f"Expected valid {path.suffix[1:].upper()}, but parsing failed: {err}"]) from None
    return parse_job(data, source=str(path), base=path.resolve().parent)


def parse_job(data: Any, source: str = "<job>", base: Path = Path(".")) -> Job:
    """Validate a job given as a dict (the parsed file)."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise JobError(source, [f"Expected a mapping with {list(JOB_FIELDS)} at the top, but got {_got(data)}."])
    _unknown("job", data, JOB_FIELDS, errors)
    top = _top_fields(data, errors)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        errors.append(f"job, field `defaults`: Expected a mapping of shot fields, but got {_got(defaults)}.")
        defaults = {}
    _unknown("defaults", defaults, SHOT_FIELDS, errors)
    shots = _shots(data.get("shots"), defaults, top, errors)
    if not errors:
        _check_names(shots, errors)
    if errors:
        raise JobError(source, errors)
    return Job(source=source, shots=tuple(shots), base=base, **top)


def _top_fields(data: dict, errors: list[str]) -> dict:
    def check(name: str, ok, expected: str, default):
        value = data.get(name, default)
        if not ok(value):
            errors.append(f"job, field `{name}`: Expected {expected}, but got {_got(value)}.")
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
    if top["guard"] is not None and top["block_map"] is None:
        errors.append("job, field `guard`: Expected a job with a `block_map` (the guard renders flagged prompts at "
                      "`guard_fidelity`), but got no block_map.")  # fmt: skip
    return top


def _shots(raw: Any, defaults: dict, top: dict, errors: list[str]) -> list[Shot]:
    if not isinstance(raw, list) or not raw:
        errors.append(f"job, field `shots`: Expected a non-empty list of shots, but got {_got(raw)}.")
        return []
    shots, seen = [], {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            errors.append(f"shots[{i}]: Expected a mapping with `id`, `prompt` and `seeds`, but got {_got(item)}.")
            continue
        sid = item.get("id")
        where = f"shots[{i}]" + (f" (id {short_repr(sid, 70)})" if isinstance(sid, str) else "")
        if not (isinstance(sid, str) and _ID.fullmatch(sid)):
            errors.append(
                f"{where}, field `id`: Expected a name of letters, digits, '_' or '-' (at most 64, "
                f"starting with a letter or digit), but got {_got(sid) if 'id' in item else 'nothing'}."
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
        if values and top["block_map"] is None and any(f != 0 for f in values["fidelity"]):
            errors.append(
                f"{where}, field `fidelity`: Expected 0 when the job has no `block_map`, but got "
                f"{list(values['fidelity'])}. Add `block_map:` to the job, or set fidelity to 0."
            )
        if len(errors) == n and isinstance(sid, str):
            shots.append(Shot(sid, i, values))
    return shots


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
    for name in ("strength", "steps", "guidance", "frames", "fps"):
        v[name] = _option(merged, name, where, errors, getattr(GenerationOptions, name))
    v["seeds"] = _seeds(merged["seeds"], where, errors) if "seeds" in merged else ()  # missing: reported above
    v["fidelity"] = _fidelities(merged.get("fidelity", 0.0), where, errors)
    v["window"] = _window(merged.get("window", [0.0, 1.0]), where, errors)
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
                f"{where}, field `seeds`: Expected {expected} with count in [1, {MAX_OUTPUTS}], but got {_got(raw)}."
            )
            return ()
        raw = list(range(raw["start"], raw["start"] + raw["count"]))
    if not isinstance(raw, list) or not raw or not all(_is_int(s) and 0 <= s < 2**63 for s in raw):
        errors.append(f"{where}, field `seeds`: Expected {expected}, but got {_got(raw)}.")
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
            errors.append(f"{where}, field `fidelity`: Expected {expected} (count in [1, 1001]), but got {_got(raw)}.")
            return ()
        a, b, n = float(raw["from"]), float(raw["to"]), raw["count"]
        raw = [a] if n == 1 else [round(a + (b - a) * i / (n - 1), 6) + 0.0 for i in range(n)]
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(_is_num(f) and -1 <= f <= 1 for f in values):
        errors.append(f"{where}, field `fidelity`: Expected {expected}, but got {_got(raw)}.")
        return ()
    values = [float(f) + 0.0 for f in values]  # + 0.0 turns -0.0 into 0.0
    if len(set(values)) != len(values):
        errors.append(f"{where}, field `fidelity`: Expected distinct values, but got {_got(raw)}.")
        return ()
    return tuple(values)


def _window(raw: Any, where: str, errors: list[str]) -> tuple[float, float]:
    if not (isinstance(raw, list) and len(raw) == 2 and all(_is_num(x) for x in raw)):
        errors.append(
            f"{where}, field `window`: Expected [start, stop] with 0 <= start <= stop <= 1 (the part of "
            f"the noise schedule where the knob acts), but got {_got(raw)}."
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
            f"in [1, 16384], but got {_got(raw)}."
        )
        return None
    return (pair[0], pair[1])


def _pattern(raw: Any, where: str, errors: list[str]) -> str:
    expected = f"a relative name pattern using {{{'}, {'.join(NAME_FIELDS)}}} (no extension)"
    if not isinstance(raw, str) or not raw:
        errors.append(f"{where}, field `name`: Expected {expected}, but got {_got(raw)}.")
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
    opts = GenerationOptions(
        prompt=v["prompt"], negative_prompt=v["negative_prompt"], seed=seed, steps=v["steps"], guidance=v["guidance"],
        fidelity=fid, strength=v["strength"], start=v["window"][0], stop=v["window"][1], batch_size=batch_size,
        frames=v["frames"],
        fps=(v["fps"] or 8) if v["frames"] is not None else None,
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


def _unknown(where: str, d: dict, known: tuple[str, ...], errors: list[str]) -> None:
    for key in d:
        if key not in known:
            name = str(key)[:80] + ("…" if len(str(key)) > 80 else "")
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            errors.append(f"{where}, field `{name}`: Expected one of {list(known)}, but got this unknown field.{hint}")


def _got(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {short_repr(value)}"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _parse_json(text: str) -> Any:
    def no_duplicates(pairs):
        dup = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        if dup:
            raise ValueError(f"duplicate key(s) {short_repr(dup)}")
        return dict(pairs)

    return json.loads(text, object_pairs_hook=no_duplicates)


_MERGE = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects duplicate keys (instead of keeping the last one) and aliases (`*name`) except
    as merge keys (`<<: *defaults`): an alias of an alias of a list ("billion laughs") would expand exponentially."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_aliases(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeConstructor says so
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


def _check_aliases(root: yaml.Node) -> None:
    """Walk the node graph in document order; a node met again is an alias, allowed only as a merge key's value."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, merge = stack.pop()
        if id(node) in seen:
            if not merge:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    "Expected no aliases (*name) except as a merge key (<<: *name), but the anchor "
                    "defined here is used elsewhere",
                    node.start_mark,
                )
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, merge) for child in reversed(node.value))  # a merge list holds aliases
        elif isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                stack.append((value, key.tag == _MERGE))
                stack.append((key, False))
