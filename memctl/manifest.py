"""The render folder's bookkeeping: `manifest.jsonl` (one JSON record per output), the per-process parts and status
files under `.memctl/`, and the checks that keep a rerun from overwriting what memctl did not write.

    >>> _record(b'{"name": "a.png", "sha256": "00", "key": "k"}')["name"]
    'a.png'
    >>> _record(b'{"name": "a.png"}') is None  # not memctl's: no sha256 or key
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from memctl.atomic import TEMP_MARK, atomic_write
from memctl.options import short_repr

MANIFEST = "manifest.jsonl"
STATE_DIR = ".memctl"  # per-process manifest parts and status files while a render runs
_RECORD_KEYS = ("name", "sha256", "key")  # what makes a manifest line memctl's


@dataclass
class Summary:
    """What a render did: outputs done, skipped (already verified) and failed with reasons."""

    total: int = 0
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    manifest: Path | None = None
    sheets: list[Path] = field(default_factory=list)  # contact sheets, one per shot of images
    baked: list[Path] = field(default_factory=list)  # `bake: true`: baked copies of the model (diffusers folders)

    @property
    def ok(self) -> bool:
        return not self.failed

    def text(self) -> str:
        lines = [
            f"memctl render: {self.total} outputs: {len(self.done)} done, {len(self.skipped)} skipped "
            f"(already done), {len(self.failed)} failed"
        ]
        lines += [f"  failed {name}: {reason}" for name, reason in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more (see the lines above)")
        if self.manifest is not None:
            lines.append(f"manifest: {self.manifest}")
        if self.sheets:
            lines.append(
                f"contact sheets (seeds x fidelities): {', '.join(str(p) for p in self.sheets[:3])}"
                + (f" and {len(self.sheets) - 3} more" if len(self.sheets) > 3 else "")
            )
        if self.baked:
            lines.append(
                f"baked copies (pipeline folders, provenance in bake.json): {', '.join(map(str, self.baked))}"
            )
        return "\n".join(lines)


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, sort_keys=True).encode())


def _sha256(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def _read_records(out: Path) -> dict[str, dict]:
    """Latest record per name from `manifest.jsonl` and any parts a killed run left.

    A line that does not decode is skipped with a warning naming the file and line (a part's torn last line, which
    a killed run leaves, silently)."""
    records: dict[str, dict] = {}
    for path in [out / MANIFEST, *sorted((out / STATE_DIR).glob("manifest.part-*.jsonl"))]:
        lines = _lines(path)
        for i, line in enumerate(lines, 1):
            rec = _record(line)
            if rec is not None:
                records[rec["name"]] = rec
            elif line.strip() and not (path.name != MANIFEST and i == len(lines)):
                warnings.warn(
                    f"{path}, line {i}: skipped (expected a JSON record of memctl render, but got "
                    f"{short_repr(line[:200])}).",
                    stacklevel=2,
                )
    return records


def _lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().split(b"\n") if path.is_file() else []
    except OSError as err:
        raise ValueError(f"Expected a readable {path}, but reading it failed: {err.strerror or err}.") from None


def _record(line: bytes) -> dict | None:
    """The manifest record in `line`, or None when it does not decode or is not memctl's."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    ok = isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in _RECORD_KEYS)
    return rec if ok else None


def _check_manifest(path: Path) -> None:
    """Refuse a `manifest.jsonl` that is not memctl's (rewriting it would lose its lines)."""
    lines = [line for line in _lines(path) if line.strip()]
    if lines and not any(_record(line) is not None for line in lines):
        raise ValueError(
            f"Expected {path} to be memctl's manifest (JSON lines with {list(_RECORD_KEYS)}), but "
            f"it is not; memctl would rewrite it. Move it away, or choose another --out."
        )
    for i, line in enumerate(lines, 1):
        try:
            json.loads(line.decode("utf-8"))
        except ValueError:
            continue  # undecodable: skipped with a warning when read
        if _record(line) is None:
            raise ValueError(
                f"Expected {path} to be memctl's manifest, but line {i} is JSON of another kind "
                f"({short_repr(line.decode('utf-8'))}); memctl would drop it. Move the file away, "
                "or choose another --out."
            )


def _check_not_foreign(out: Path, names: set[str], records: dict) -> None:
    """Refuse to overwrite files at output names that no manifest record owns (they may be the user's)."""
    foreign = sorted(n for n in names if n not in records and os.path.lexists(out / n))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ValueError(
            f"Expected no files at output names that memctl did not write, but {out} has "
            f"{', '.join(foreign[:3])}{more}, which manifest.jsonl does not list. Move them away, or "
            "pass --force to overwrite them."
        )


def _is_verified(out: Path, records: dict, o, renderer) -> bool:
    rec = records.get(o.name)
    return rec is not None and rec.get("key") == renderer.key(o) and _sha256(out / o.name) == rec.get("sha256")


def _merge(out: Path, mine: Summary, processes: int) -> Summary:
    """Main process, after every process finished: one deduplicated manifest sorted by name, and the summary.

    When the manifest cannot be rewritten (a full disk) the parts stay for the next run and the summary says so."""
    state_dir = out / STATE_DIR
    summary = Summary(total=mine.total, done=list(mine.done), failed=list(mine.failed), manifest=out / MANIFEST)
    for rank in range(1, processes):
        path = state_dir / f"status-{rank}.json"
        try:
            status = json.loads(path.read_text())
            summary.done += status["done"]
            summary.failed += [tuple(x) for x in status["failed"]]
            path.unlink()
        except (OSError, ValueError, KeyError, TypeError) as err:
            summary.failed.append(
                (
                    f"(process {rank})",
                    f"its status is unknown ({type(err).__name__}: {err}); its "
                    "saved outputs are in the manifest, see its own output for the rest",
                )
            )
    records = _read_records(out)
    kept = [records[n] for n in sorted(records) if _sha256(out / n) == records[n].get("sha256")]
    try:
        atomic_write(out / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
    except OSError as err:
        summary.failed.append(
            (
                MANIFEST,
                f"not rewritten ({type(err).__name__}: {err.strerror or err}); its records "
                f"wait in {state_dir} and the next run merges them",
            )
        )
    else:
        for path in state_dir.glob("manifest.part-*.jsonl"):
            path.unlink()
    summary.done.sort()
    summary.failed.sort()
    return summary


def _remove_stale(out: Path, names: set[str]) -> None:
    """Temp files a killed render of these output names left (`.NAME.memctl-XXXXXXXX.part`, made under the lock
    of `out`, so no running render owns them), and status files; nothing else."""
    for folder in {(out / n).parent for n in names}:
        if not folder.is_dir():
            continue
        for path in folder.glob(f".*{TEMP_MARK}*.part"):
            stem = path.name[1 : path.name.rfind(TEMP_MARK)]
            if (path.relative_to(out).parent / stem).as_posix() in names and re.fullmatch(
                r"[A-Za-z0-9_]{8}\.part", path.name[path.name.rfind(TEMP_MARK) + len(TEMP_MARK) :]
            ):
                path.unlink(missing_ok=True)
    for path in (out / STATE_DIR).glob("status-*.json"):
        path.unlink()


def _check_inside(out: Path, names: set[str]) -> None:
    root = out.resolve()
    for folder in sorted({(out / n).parent for n in names}):
        if not folder.resolve().is_relative_to(root):
            raise ValueError(
                f"Expected every output inside {out}, but {folder} resolves to {folder.resolve()} "
                "(a symbolic link in the output folder). Remove the link or choose another --out."
            )
