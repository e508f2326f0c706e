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
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from memctl.blocks import pipeline_denoisers
from memctl.jobs import Job, JobError, Output, load_job
from memctl.metadata import file_mode, provenance, save_png
from memctl.options import short_repr
from memctl.pipelines import call_parameters

MANIFEST = "manifest.jsonl"
STATE_DIR = ".memctl"  # per-process manifest parts and status files while a render runs
LOCK = "lock"  # in STATE_DIR: held (fcntl.flock) by the main process for the whole run
_TEMP_MARK = ".memctl-"  # our temp files: "." + name + ".memctl-" + mkstemp's 8 characters + ".part"
_RECORD_KEYS = ("name", "sha256", "key")  # what makes a manifest line memctl's
_FATAL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # stop this process: every further write would fail too


@dataclass
class Summary:
    """What a render did: outputs done, skipped (already verified) and failed with reasons."""

    total: int = 0
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    manifest: Path | None = None
    sheets: list[Path] = field(default_factory=list)  # contact sheets, one per shot of images

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
        return "\n".join(lines)


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
    batches = job.batches()
    names = {o.name for b in batches for o in b}
    _check_inside(out, names)
    state_dir = out / STATE_DIR
    _check_manifest(out / MANIFEST)  # on every process (it only reads): all stop together on a foreign manifest
    if state.is_main_process:
        _remove_stale(out, names)
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
        _remove_empty(made)
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
            _remove_empty(made)
        raise
    else:
        lock.unlink(missing_ok=True)  # while still holding it: whoever opened this file cannot lock it any more
    finally:
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


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
        atomic_write(out / o.name, blob, before_rename=lambda: _append_line(part, record), stop_at=out)
    except OSError as err:
        reason = f"{type(err).__name__}: {err.strerror or err} while writing {o.name}"
        summary.failed.append((o.name, reason))
        return reason if err.errno in _FATAL else None
    summary.done.append(o.name)
    return None


class Renderer:
    """The job's pipeline and block map, checked against every shot; samples batches and encodes files."""

    def __init__(self, job: Job, device, pipeline=None):
        self.job, self.testbed, self.bmap, self._applied = job, None, None, None
        errors: list[str] = []
        self.pipe = pipeline if pipeline is not None else self._load_model(errors)
        if pipeline is not None:  # a pipeline handed in: still know the testbed the job names (for `shipped`)
            self.testbed = self._named_testbed()
        if self.pipe is not None:
            if job.cpu_threads is not None and torch.device(device).type == "cpu":
                torch.set_num_threads(job.cpu_threads)
            if hasattr(self.pipe, "to") and pipeline is None:
                self.pipe.to(device)
            self._check_shots(errors)
            if job.block_map is not None:
                self.bmap = self._load_map(errors)
        if errors:
            raise JobError(job.source, errors)
        from memctl.blockmap import fingerprint

        prints = {c: fingerprint(m) for c, m in _denoisers(self.pipe).items()}
        self.model_info = {"spec": job.model, "fingerprints": prints}
        self.map_info = None if self.bmap is None else {"spec": job.block_map, "fingerprints": self.bmap.fingerprints}
        self.versions = provenance()
        self.guarded = self._guard() if job.guard else {}  # prompt -> {"flagged", "risk", "p_value"}

    def _guard(self) -> dict:
        """`guard: detect`: screen every prompt of the job once (`memctl.signals.screen`, against the testbed's
        ordinary prompts, else the job's prompts)."""
        from memctl.signals import screen

        prompts = sorted({o.options.prompt for o in self.job.outputs()})
        reference = self.testbed.ordinary_prompts() if self.testbed is not None else prompts
        scores = screen(self.pipe, prompts, reference)
        return {s.prompt: {"flagged": s.flagged, "risk": round(s.risk, 4), "p_value": s.p_value} for s in scores}

    def guard_info(self, o: Output) -> dict | None:
        """The guard's reading of this output's prompt and the fidelity it is rendered at (None without a guard)."""
        if not self.guarded:
            return None
        flagged = self.guarded[o.options.prompt]["flagged"]
        fid = self.job.guard_fidelity if flagged else o.options.fidelity
        return {**self.guarded[o.options.prompt], "rendered_fidelity": fid}

    def _named_testbed(self):
        from memctl.zoo.testbed import TESTBEDS, load_testbed

        path = Path(self.job.model) if Path(self.job.model).is_absolute() else self.job.base / self.job.model
        if self.job.model in TESTBEDS:
            return load_testbed(self.job.model)
        return load_testbed(path) if (path / "testbed.json").is_file() else None

    def _load_model(self, errors: list[str]):
        from memctl.loading import load_pipeline
        from memctl.zoo.testbed import TESTBEDS, load_testbed

        spec, dtype = self.job.model, getattr(torch, self.job.dtype)
        path = Path(spec) if Path(spec).is_absolute() else self.job.base / spec
        try:
            if spec in TESTBEDS or (path / "testbed.json").is_file():
                self.testbed = load_testbed(spec if spec in TESTBEDS else path)
                return self.testbed.pipeline(torch_dtype=dtype)
            if path.exists():
                return load_pipeline(path, torch_dtype=dtype)
            if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
                return load_pipeline(spec, torch_dtype=dtype)
        except Exception as err:
            errors.append(
                f"job, field `model`: Expected a loadable pipeline, but loading {spec!r} failed: "
                f"{type(err).__name__}: {err}"
            )
            return None
        errors.append(
            f"job, field `model`: Expected a testbed name ({', '.join(sorted(TESTBEDS))}), a pipeline "
            f"folder (relative to the job file) or a hub id, but got {spec!r}: no such folder."
        )
        return None

    def _load_map(self, errors: list[str]):
        spec, where = self.job.block_map, "job, field `block_map`"
        try:
            import memctl.knob  # noqa: F401
            from memctl.blockmap import BlockMap
        except ImportError as err:
            errors.append(f"{where}: Expected memctl.blockmap and memctl.knob to be installed, but {err}.")
            return None
        path = Path(spec) if Path(spec).is_absolute() else self.job.base / spec
        try:
            if spec == "shipped":
                if self.testbed is None:
                    raise ValueError(f"'shipped' works only with a testbed model, not {self.job.model!r}")
                bmap = self.testbed.block_map()
            elif not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            else:
                bmap = BlockMap.load(path)
        except Exception as err:
            errors.append(
                f"{where}: Expected a readable block map file, but reading {spec!r} failed: "
                f"{type(err).__name__}: {err}"
            )
            return None
        try:
            denoisers = _denoisers(self.pipe)
            for component in bmap.fingerprints:
                if component not in denoisers:
                    raise ValueError(f"the map covers {component!r}, which this pipeline does not have")
                bmap.check_model(denoisers[component], component=component)
        except Exception as err:
            errors.append(
                f"{where}: Expected a block map made for model {self.job.model!r}, but {spec!r} does not fit it: {err}"
            )
            return None
        return bmap

    def _check_shots(self, errors: list[str]) -> None:
        params = call_parameters(self.pipe)  # custom pipelines too: FidelityMixin forwards **kwargs
        self.video, self.sizable = "num_frames" in params, "height" in params and "width" in params
        native = _native_size(self.pipe)
        too_long = _token_check(self.pipe)
        for shot in self.job.shots:
            v = shot.values
            for name in ("prompt", "negative_prompt"):
                problem = too_long(v[name])
                if problem:
                    errors.append(f"{shot.where()}, field `{name}`: {problem}")
            if self.video != (v["frames"] is not None):
                want = "`frames` (this model makes videos)" if self.video else "no `frames` (this model makes images)"
                errors.append(f"{shot.where()}, field `frames`: Expected {want}, but got {v['frames']!r}.")
            if v["size"] is not None and not self.sizable and v["size"] != native:
                errors.append(
                    f"{shot.where()}, field `size`: Expected null or {list(native) if native else 'null'} "
                    f"(this pipeline renders at one size), but got {list(v['size'])}."
                )

    def encode(self, batch: tuple[Output, ...]) -> list[bytes]:
        """Sample one batch (one shot and fidelity, one generator per seed) and encode each output's file."""
        o = batch[0].options
        generators = [torch.Generator().manual_seed(x.options.seed) for x in batch]  # one per image, on the CPU
        kwargs = {
            "prompt": [x.options.prompt for x in batch],
            "num_inference_steps": o.steps,
            "guidance_scale": o.guidance,
            "generator": generators,
        }
        if o.negative_prompt:
            kwargs["negative_prompt"] = [o.negative_prompt] * len(batch)
        if batch[0].size is not None and self.sizable:
            kwargs["width"], kwargs["height"] = batch[0].size
        if self.video:
            kwargs.update(num_frames=o.frames, output_type="np")
        with self._knob(batch[0]):  # a batch is one shot and fidelity: one prompt, one guard reading
            result = self.pipe(**kwargs)
        if self.video:
            return [
                encode_mp4(_frames_uint8(f), o.fps, self.embedded(x))
                for f, x in zip(result.frames, batch, strict=True)
            ]
        return [self._png(image, x) for image, x in zip(result.images, batch, strict=True)]

    def _knob(self, x: Output):
        """The knob at this output's fidelity (applied once per strength and window); 0 is the untouched model.
        With `guard: detect`, a flagged prompt's outputs are rendered at the job's `guard_fidelity` instead."""
        o = x.options
        try:
            from memctl.knob import apply_knob, fidelity, get_knob
        except ImportError:  # only jobs without a block map get here (the map check needs the knob)
            return contextlib.nullcontext()
        if self.bmap is None:  # a knob someone else applied to a given pipeline must not act
            return fidelity(self.pipe, 0.0) if get_knob(self.pipe) is not None else contextlib.nullcontext()
        if self._applied != (o.strength, o.start, o.stop):
            apply_knob(self.pipe, self.bmap, strength=o.strength, start=o.start, stop=o.stop)
            self._applied = (o.strength, o.start, o.stop)
        return fidelity(self.pipe, self.guard_info(x)["rendered_fidelity"] if self.guarded else o.fidelity)

    def close(self) -> None:
        """Remove the knob this renderer applied."""
        if self._applied is not None:
            from memctl.knob import remove_knob

            remove_knob(self.pipe)
            self._applied = None

    def _png(self, image, o: Output) -> bytes:
        buf = io.BytesIO()
        text = o.options.a1111_parameters(model=self.job.model, block_map=self.job.block_map or "")
        save_png(image, buf, self.embedded(o), parameters=text)
        return buf.getvalue()

    def embedded(self, o: Output) -> dict:
        """The settings written into the file itself (no time: the bytes must not depend on when)."""
        return {
            "name": o.name,
            "shot": o.shot,
            **o.settings(),
            "model": self.model_info,
            "block_map": self.map_info,
            "versions": self.versions,
            **({"guard": self.guard_info(o)} if self.guarded else {}),
        }

    def key(self, o: Output) -> str:
        """What the pixels depend on; a manifest record with another key is stale."""
        what = {
            "kind": o.kind,
            "settings": o.settings(),
            "model": self.model_info["fingerprints"],
            "block_map": self.map_info and self.map_info["fingerprints"],
            **({"guard": self.guard_info(o)["rendered_fidelity"]} if self.guarded else {}),
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def record(self, o: Output, blob: bytes, seconds: float, rank: int) -> dict:
        return {
            "name": o.name,
            "kind": o.kind,
            "shot": o.shot,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "key": self.key(o),
            "settings": o.settings(),
            "model": self.model_info,
            "block_map": self.map_info,
            "versions": self.versions,
            **({"guard": self.guard_info(o)} if self.guarded else {}),
            "job": self.job.source,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 4),
            "process": rank,
        }


SHEET_CELL = 128  # contact sheet tiles: smaller images enlarged to a whole multiple of their size at least this big
SHEET_MAX = (32, 16)  # at most this many seeds (rows) and fidelities (columns) per sheet


def write_contact_sheets(out: Path, job: Job) -> list[Path]:
    """`out/SHOT.contact.png` for each shot of images: its seeds (rows) by fidelities (columns, -1 first), enlarged
    and labelled; outputs not on disk stay empty. A sheet is rewritten only when its bytes change."""
    names, by_shot = set(), {}
    for o in job.outputs():
        names.add(o.name)
        if o.kind == "png":
            by_shot.setdefault(o.shot, {})[(o.options.seed, o.options.fidelity)] = out / o.name
    written = []
    for shot in job.shots:
        cells = {k: p for k, p in by_shot.get(shot.id, {}).items() if p.is_file()}
        path = out / f"{shot.id}.contact.png"
        if not cells or path.name in names:  # nothing to show, or an output has this name
            continue
        buf = io.BytesIO()
        contact_sheet(shot, cells).save(buf, format="PNG")
        if not (path.is_file() and path.read_bytes() == buf.getvalue()):
            try:
                atomic_write(path, buf.getvalue(), write=_write_plain)
            except OSError as err:  # a sheet is a view of the outputs: its failure does not fail the render
                print(f"memctl render: contact sheet {path} not written: {err.strerror or err}", file=sys.stderr)
                continue
        written.append(path)
    return written


def contact_sheet(shot, cells: dict[tuple[int, float], Path]):
    """One shot's sheet (a PIL image) from `{(seed, fidelity): png path}`; at most `SHEET_MAX` seeds x fidelities."""
    from memctl.grid import make_grid

    seeds, fids = list(shot.values["seeds"]), sorted(set(shot.values["fidelity"]))
    rows, cols = seeds[: SHEET_MAX[0]], fids[: SHEET_MAX[1]]
    images = {k: _open_rgb(p) for k, p in cells.items() if k[0] in rows and k[1] in cols}
    side = max((max(im.size) for im in images.values()), default=SHEET_CELL)
    cell = side * -(-SHEET_CELL // side) if side < SHEET_CELL else min(side, 2 * SHEET_CELL)  # whole multiples
    title = f"{shot.id}: {short_repr(shot.values['prompt'], 80)} - fidelity -1 new ... +1 faithful"
    if (len(rows), len(cols)) != (len(seeds), len(fids)):
        title += f" (first {len(rows)} of {len(seeds)} seeds, {len(cols)} of {len(fids)} fidelities)"
    grid = [(f"seed {s}", [images.get((s, f)) for f in cols]) for s in rows]
    header = [f"fidelity {f + 0.0:+g}" for f in cols]  # + 0.0: no "-0"
    return make_grid(grid, title=title, header=header, cell=cell, label_width=110)


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _denoisers(pipe) -> dict[str, torch.nn.Module]:
    """`{component: denoiser}`: `unet`, `transformer` and (Wan 2.2) `transformer_2`, as block maps key them."""
    found = pipeline_denoisers(pipe)
    if not found:
        raise ValueError(f"Expected a pipeline with a `unet` or `transformer`, but got {type(pipe).__name__}.")
    return found


def _token_check(pipe):
    """`check(text) -> problem or None`: text longer than the pipeline's tokenizer reaches (the text encoder cannot
    see past its last position, so such a prompt fails or is cut at render time)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if not callable(tokenizer) or not isinstance(limit, int) or not 1 <= limit < 100_000:
        return lambda text: None
    seen: dict[str, str | None] = {}

    def check(text: str) -> str | None:
        if text not in seen:
            n = len(tokenizer(text).input_ids) if text else 0
            seen[text] = None
            if n > limit:
                seen[text] = (
                    f"Expected at most {limit} tokens (with start and end: this model's text encoder sees no "
                    f"further), but got {n} for {short_repr(text)}. Shorten it."
                )
        return seen[text]

    return check


def _native_size(pipe) -> tuple[int, int] | None:
    size = getattr(getattr(next(iter(_denoisers(pipe).values())), "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", 1) if getattr(pipe, "vae", None) is not None else 1
    if isinstance(size, int):
        return (size * scale, size * scale)
    return (size[1] * scale, size[0] * scale) if isinstance(size, (list, tuple)) and len(size) == 2 else None


def _frames_uint8(frames) -> np.ndarray:
    """`(F, H, W, 3)` uint8 from a pipeline's frames: array or tensor in [0, 1] `(F, H, W, C)`, or PIL images."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    arr = frames.float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"Expected video frames of shape (F, H, W, 1 or 3), but got {arr.shape}.")
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def encode_mp4(frames: np.ndarray, fps: int, comment: dict) -> bytes:
    """H.264 MP4 bytes of `(F, H, W, 3)` uint8 frames with `comment` as JSON in the container's metadata."""
    import imageio_ffmpeg

    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"Expected even frame width and height for yuv420p H.264, but got {w}x{h}.")
    params = [
        "-metadata",
        "comment=" + json.dumps(comment, sort_keys=True),
        "-fflags",
        "+bitexact",
        "-flags:v",
        "+bitexact",
        "-movflags",
        "+faststart",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.mp4")
        writer = imageio_ffmpeg.write_frames(
            path, (w, h), fps=fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error", output_params=params
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        return Path(path).read_bytes()


def read_mp4_comment(path: str | Path) -> dict | None:
    """The JSON `comment` that `encode_mp4` embedded, read back with the bundled ffmpeg."""
    import subprocess

    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    value = re.search(r"^comment=((?:\\.|[^\\\n])*)$", text, re.M)
    return json.loads(re.sub(r"\\(.)", r"\1", value.group(1))) if value else None


def _write_bytes(f, data: bytes) -> None:
    """The one place output bytes reach the disk (tests replace it to simulate a full disk)."""
    f.write(data)


def _write_plain(f, data: bytes) -> None:
    f.write(data)


def atomic_write(dest: Path, data: bytes, before_rename=None, stop_at: Path | None = None, write=None) -> None:
    """Write `data` to a temp file beside `dest`, fsync, call `before_rename`, then rename over `dest`.

    On any failure the temp file goes, and so do folders this call made (up to `stop_at`): no partial output."""
    made = [p for p in [dest.parent, *dest.parent.parents] if not p.exists() and p != stop_at][::-1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}{_TEMP_MARK}", suffix=".part")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; outputs get what the user's umask says
        with os.fdopen(fd, "wb") as f:
            (write or _write_bytes)(f, data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        _remove_empty(made)
        raise


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, sort_keys=True).encode(), write=_write_plain)


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


def _is_verified(out: Path, records: dict, o: Output, renderer: Renderer) -> bool:
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
        atomic_write(
            out / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode(), write=_write_plain
        )
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
        for path in folder.glob(f".*{_TEMP_MARK}*.part"):
            stem = path.name[1 : path.name.rfind(_TEMP_MARK)]
            if (path.relative_to(out).parent / stem).as_posix() in names and re.fullmatch(
                r"[A-Za-z0-9_]{8}\.part", path.name[path.name.rfind(_TEMP_MARK) + len(_TEMP_MARK) :]
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


def main(argv: list[str] | None = None) -> int:
    """`memctl render JOB ...` as a function that returns the exit code (`python -m memctl.render` runs it too).

    Under accelerate the documented command is `accelerate launch ... -m memctl render JOB ...`."""
    from memctl.cli import main as cli_main

    return cli_main(["render", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
