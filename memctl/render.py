"""`memctl render JOB.yaml`: batch renders from a job file, resumable, with provenance, on one or many processes.

    memctl render assets/example-job.yaml --out out/render/example      # one process
    accelerate launch --multi_gpu --num_processes 8 -m memctl render JOB.yaml --out DIR  # 8 GPUs; torchrun too

Every output is written atomically (temp file, fsync, rename) and recorded in `manifest.jsonl` (settings, seed,
model and map fingerprints, versions, time, sha256). A rerun skips outputs whose file still matches its record
and settings; `--force` redoes them. Each image has its own `torch.Generator().manual_seed(seed)` and the
batches are fixed by the job, so the same job on the same machine gives byte-identical PNGs however it is split.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from pathlib import Path

import torch

from memctl.atomic import TEMP_MARK as _TEMP_MARK  # noqa: F401  (tests and older callers read it here)
from memctl.atomic import atomic_write, remove_empty
from memctl.jobs import Job, Output, load_job
from memctl.manifest import (
    MANIFEST,
    STATE_DIR,
    Summary,
    _append_line,
    _check_inside,
    _check_manifest,
    _check_not_foreign,
    _is_verified,
    _merge,
    _read_records,
    _remove_stale,
    _write_json,
)
from memctl.renderer import Renderer
from memctl.sheets import SHEET_CELL, SHEET_MAX, contact_sheet, write_contact_sheets
from memctl.video import encode_mp4, read_mp4_comment

__all__ = [
    "LOCK", "MANIFEST", "SHEET_CELL", "SHEET_MAX", "STATE_DIR", "Renderer", "Summary", "atomic_write",
    "contact_sheet", "encode_mp4", "lock_out", "read_mp4_comment", "render_job", "write_contact_sheets",
]  # fmt: skip

LOCK = "lock"  # in STATE_DIR: held (fcntl.flock) by the main process for the whole run
_FATAL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # stop this process: every further write would fail too


def _write_bytes(f, data: bytes) -> None:
    """The one place output bytes reach the disk (tests replace it to simulate a full disk)."""
    f.write(data)


def render_job(job: str | Path | Job, out: str | Path | None = None, force: bool = False, pipeline=None) -> Summary:
    """Render a job; returns this process's `Summary` (on the main process: the whole job's).

    The job is validated, the model and block map loaded and checked, and every output planned before anything
    is written. `pipeline` replaces loading the job's model (tests, notebooks, models held in memory)."""
    job = job if isinstance(job, Job) else load_job(job)
    out = Path(out) if out is not None else Path("out/render") / Path(job.source).stem
    state = _process_state()
    with contextlib.ExitStack() as stack:
        if state.is_main_process:
            stack.enter_context(lock_out(out))  # before the model loads: a busy or unwritable --out fails fast
        return _render_locked(job, out, force, pipeline, state)


def _render_locked(job: Job, out: Path, force: bool, pipeline, state) -> Summary:
    renderer = Renderer(job, state.device, pipeline)
    job = renderer.job  # a `window: calibrated` shot's window resolved
    batches = job.batches()
    names = {o.name for b in batches for o in b}
    _check_inside(out, names)
    state_dir = out / STATE_DIR
    _check_manifest(out / MANIFEST)  # on every process (it only reads): all stop together on a foreign manifest
    baked = []
    if state.is_main_process:
        _remove_stale(out, names)
        baked = renderer.bake_copies(out)  # before any knob is applied, and before rendering
    state.wait_for_everyone()
    records = _read_records(out)
    verified = set() if force else {o.name for b in batches for o in b if _is_verified(out, records, o, renderer)}
    if not force:
        _check_not_foreign(out, names - verified, records)
    pending = [b for b in batches if not all(o.name in verified for o in b)]
    state.wait_for_everyone()  # every process has read the folder before any writes to it
    mine = Summary(total=sum(len(b) for b in batches))
    try:
        with state.split_between_processes(pending) as share:
            _render_share(renderer, out, share, verified, mine, state)
    finally:
        renderer.close()
    if not state.is_main_process:
        status = state_dir / f"status-{state.process_index}.json"
        try:
            _write_json(status, {"done": mine.done, "failed": mine.failed})
        except OSError as err:  # the main process reports this process as unknown; its own summary goes here
            print(f"{mine.text()}\nmemctl render: could not write {status}: {err}", file=sys.stderr, flush=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        return mine
    whole = _merge(out, mine, state.num_processes)
    whole.skipped = sorted(o.name for b in batches for o in b if o.name in verified)
    whole.sheets = write_contact_sheets(out, job)
    whole.baked = baked
    print(whole.text(), flush=True)
    return whole


@contextlib.contextmanager
def lock_out(out: Path):
    """Hold `out/.memctl/lock` (fcntl.flock) for the whole run: a second render into `out` stops with a clear error."""
    import fcntl

    if out.exists() and not out.is_dir():
        raise ValueError(f"Expected --out {out} to be a folder, but it is a file. Choose another --out.")
    lock = out / STATE_DIR / LOCK
    made = [p for p in [lock.parent, *lock.parent.parents] if not p.exists()][::-1]
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        remove_empty(made)
        raise ValueError(
            f"Expected a writable output folder at {out}, but creating {lock} failed: "
            f"{err.strerror or err}. Choose another --out or fix its permissions."
        ) from None
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"Expected --out {out} to be free, but another memctl render is writing into it (it "
                f"holds {lock}). Wait for it to finish, or choose another --out."
            ) from None
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # a run that just finished removed the file we opened
            raise ValueError(f"Expected --out {out} to be free, but another memctl render just used it; run again.")
        locked = True
        yield lock
    except BaseException:
        if locked:  # a job refused before any output: leave no folders behind
            lock.unlink(missing_ok=True)
            remove_empty(made)
        raise
    else:
        lock.unlink(missing_ok=True)  # while still holding it: whoever opened this file cannot lock it any more
    finally:
        os.close(fd)


def _process_state():
    """accelerate's `PartialState`, on CPU too (it needs `cpu=True` to use gloo when a launcher started many)."""
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world != state.num_processes:  # every process would render every output
        raise RuntimeError(
            f"Expected {world} processes (WORLD_SIZE) in accelerate's state, but got "
            f"{state.num_processes}. Launch with `accelerate launch` or `torchrun`."
        )
    return state


def _render_share(renderer: Renderer, out: Path, share: list, verified: set, summary: Summary, state) -> None:
    from tqdm.auto import tqdm

    part = out / STATE_DIR / f"manifest.part-{state.process_index}.jsonl"
    todo = [o for b in share for o in b if o.name not in verified]
    desc = "render" if state.num_processes == 1 else f"render (process {state.process_index} of {state.num_processes})"
    bar = tqdm(total=len(todo), unit="img", desc=desc, disable=not state.is_local_main_process, dynamic_ncols=True)
    fatal = None
    for batch in share:
        names = [o.name for o in batch if o.name not in verified]
        if fatal is not None:
            summary.failed += [(n, f"not attempted: {fatal}") for n in names]
            continue
        try:
            start = time.perf_counter()
            data = renderer.encode(batch)
            seconds = (time.perf_counter() - start) / len(batch)
        except Exception as err:  # a failing shot must not stop the others
            summary.failed += [(n, f"{type(err).__name__}: {err}") for n in names]
            bar.update(len(names))
            continue
        for o, blob in zip(batch, data, strict=True):
            if o.name not in verified:
                fatal = _save(renderer, out, o, blob, seconds, part, summary, state.process_index) or fatal
                bar.update(1)
    bar.close()


def _save(
    renderer: Renderer, out: Path, o: Output, blob: bytes, seconds: float, part: Path, summary: Summary, rank: int
) -> str | None:
    """Write one output and its manifest record; returns a reason to stop when the disk cannot take more."""
    record = renderer.record(o, blob, seconds, rank)
    try:
        atomic_write(
            out / o.name, blob, before_rename=lambda: _append_line(part, record), stop_at=out, write=_write_bytes
        )
    except OSError as err:
        reason = f"{type(err).__name__}: {err.strerror or err} while writing {o.name}"
        summary.failed.append((o.name, reason))
        return reason if err.errno in _FATAL else None
    summary.done.append(o.name)
    return None
