"""The renderer of `memctl render`: a job's pipeline and block map, checked against every shot before anything is
written; it samples one batch at a time and encodes each output's file (PNG with settings, or MP4).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from memctl import signals
from memctl.bake import bake, fit_prompts, map_sha256, matches, prompts_sha256
from memctl.blockmap import BlockMap, fingerprint
from memctl.blocks import require_denoisers
from memctl.composed import check_denoiser, composed, parts_for, require_parts
from memctl.detection import prompt_lines
from memctl.jobs import CALIBRATED, Job, JobError, Output
from memctl.knob import apply_knob, fidelity, get_knob, remove_knob
from memctl.loading import is_testbed, load_model_and_testbed
from memctl.metadata import provenance, save_png
from memctl.options import short_repr
from memctl.pipelines import call_parameters
from memctl.video import as_uint8_frames, encode_mp4
from memctl.zoo.testbed import TESTBEDS, load_testbed


class Renderer:
    """The job's pipeline and block map, checked against every shot; samples batches and encodes files."""

    def __init__(self, job: Job, device, pipeline=None):
        self.job, self.testbed, self.bmap, self._applied = job, None, None, None
        # `window: calibrated`: calibrate_window's choice per steps and guidance
        self.calibrations: dict[str, dict] = {}
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
            if not errors:
                self._calibrate_windows(errors)
            if job.block_map is not None:
                self.bmap = self._load_map(errors)
            self.bake_prompts = self._bake_prompts(errors)
        if errors:
            raise JobError(job.source, errors)
        prints = {c: fingerprint(m) for c, m in require_denoisers(self.pipe).items()}
        self.model_info = {"spec": job.model, "fingerprints": prints}
        self.map_info = None if self.bmap is None else {"spec": job.block_map, "fingerprints": self.bmap.fingerprints}
        self.versions = provenance()
        self.guarded = self._guard() if job.guard else {}  # prompt -> {"flagged", "risk", "p_value"}

    def _guard(self) -> dict:
        """`guard: detect`: screen every prompt of the job once (`memctl.signals.screen`, against the testbed's
        ordinary prompts, else the job's prompts)."""
        prompts = sorted({o.options.prompt for o in self.job.outputs()})
        reference = self.testbed.ordinary_prompts() if self.testbed is not None else prompts
        scores = signals.screen(self.pipe, prompts, reference)
        return {s.prompt: {"flagged": s.flagged, "risk": round(s.risk, 4), "p_value": s.p_value} for s in scores}

    def _bake_prompts(self, errors: list[str]) -> list[str] | None:
        """`bake_prompts` read (relative to the job file), else the default of `memctl bake` (a testbed's canaries)."""
        if not self.job.bake or self.bmap is None:
            return None
        prompts = None
        if self.job.bake_prompts is not None:
            path = Path(self.job.bake_prompts)
            path = path if path.is_absolute() else self.job.base / path
            try:
                prompts = prompt_lines(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as err:
                errors.append(f"job, field `bake_prompts`: Expected a readable UTF-8 text file, but got {err}")
                return None
            if not prompts:
                errors.append(f"job, field `bake_prompts`: Expected at least one prompt in {path}, but it has none.")
                return None
        if len(self.bmap.fingerprints) != 1:
            errors.append(
                f"job, field `bake`: Expected a block map of one denoiser to bake, but it covers "
                f"{sorted(self.bmap.fingerprints)}."
            )
        return fit_prompts(self.bmap, self.testbed, prompts)

    def bake_copies(self, out: Path) -> list[Path]:
        """`bake: true`: a hook-free copy of the model with the knob in its weights (`memctl.bake`) per (fidelity,
        strength) of `job.bake_settings()`, in `out/baked/f-1.00_strength1.00/`. A folder whose `bake.json` already
        matches is kept (a rerun), a stale bake is replaced; a folder that is not a bake is an error. Call before
        rendering: the bake copies the plain weights."""
        settings, folders = self.job.bake_settings(), []
        if not settings:
            return folders
        (component,) = self.bmap.fingerprints
        for f, k in settings:
            folder = out / "baked" / f"f{f:+.2f}_strength{k:.2f}"
            expected = {"fidelity": f, "strength": k, "map_sha256": map_sha256(self.bmap),
                        "source_fingerprint": self.model_info["fingerprints"][component],
                        "prompts_sha256": prompts_sha256(self.bake_prompts)}  # fmt: skip
            if not matches(folder, expected):
                if folder.exists() and not (folder / "bake.json").is_file() and any(folder.iterdir()):
                    raise ValueError(
                        f"Expected {folder} to be a bake of this job or absent, but it holds other files. Move them."
                    )
                shutil.rmtree(folder, ignore_errors=True)
                bake(self.pipe, self.bmap, f, folder, strength=k, prompts=self.bake_prompts)
            folders.append(folder)
        return folders

    def guard_info(self, o: Output) -> dict | None:
        """The guard's reading of this output's prompt and the fidelity it is rendered at (None without a guard)."""
        if not self.guarded:
            return None
        flagged = self.guarded[o.options.prompt]["flagged"]
        fid = self.job.guard_fidelity if flagged else o.options.fidelity
        return {**self.guarded[o.options.prompt], "rendered_fidelity": fid}

    def _model_spec(self) -> str:
        """The job's `model` as `load_model_and_testbed` takes it: a testbed name, a folder (relative to the job
        file) or a hub id."""
        spec = self.job.model
        path = Path(spec) if Path(spec).is_absolute() else self.job.base / spec
        return spec if spec in TESTBEDS or not path.exists() else str(path)

    def _named_testbed(self):
        spec = self._model_spec()
        return load_testbed(spec) if is_testbed(spec) else None

    def _load_model(self, errors: list[str]):
        spec = self._model_spec()
        if not (is_testbed(spec) or Path(spec).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", spec)):
            errors.append(
                f"job, field `model`: Expected a testbed name ({', '.join(sorted(TESTBEDS))}), a pipeline "
                f"folder (relative to the job file) or a hub id, but got {self.job.model!r}: no such folder."
            )
            return None
        try:
            pipe, self.testbed = load_model_and_testbed(spec, torch_dtype=getattr(torch, self.job.dtype))
        except Exception as err:
            errors.append(
                f"job, field `model`: Expected a loadable pipeline, but loading {self.job.model!r} failed: "
                f"{type(err).__name__}: {err}"
            )
            return None
        return pipe

    def _load_map(self, errors: list[str]):
        spec, where = self.job.block_map, "job, field `block_map`"
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
            denoisers = require_denoisers(self.pipe)
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
            if v.get("extrapolation") == "composed":
                self._check_composed(shot, errors)
            if v["size"] is not None and not self.sizable and v["size"] != native:
                errors.append(
                    f"{shot.where()}, field `size`: Expected null or {list(native) if native else 'null'} "
                    f"(this pipeline renders at one size), but got {list(v['size'])}."
                )

    def _calibrate_windows(self, errors: list[str]) -> None:
        """Shots with `window: calibrated` get the window `memctl.composed.calibrate_window` picks for this model from
        its testbed's memorized probe pairs (`memctl.effect.testbed_window`, calibration seeds), once per steps and
        guidance; `self.job` then holds them as numbers, so names, resume keys and manifests see [start, stop]."""
        from dataclasses import replace

        from memctl.effect import testbed_window

        todo = [s for s in self.job.shots if s.values["window"] == CALIBRATED]
        if not todo:
            return
        if self.testbed is None:
            errors.append(
                f"{todo[0].where()}, field `window`: Expected a testbed model for '{CALIBRATED}' (the window is "
                f"calibrated on its memorized canaries), but got model {short_repr(self.job.model)}. Give [start, "
                "stop] (memctl.composed.calibrate_window picks one from your own memorized pairs in Python)."
            )
            return
        shots = []
        for shot in self.job.shots:
            if shot.values["window"] == CALIBRATED:
                key = f"steps {shot.values['steps']}, guidance {shot.values['guidance']:g}"
                if key not in self.calibrations:
                    print(f"memctl render: calibrating the composed window ({key}) on the testbed's memorized "
                          "probe pairs", flush=True)  # fmt: skip
                    self.calibrations[key] = testbed_window(
                        self.pipe, self.testbed, shot.values["steps"], shot.values["guidance"]
                    )
                    c = self.calibrations[key]
                    print(f"memctl render: window [{c['start']:g}, {c['stop']:g}] (copy rates {c['copy_rates']})",
                          flush=True)  # fmt: skip
                choice = self.calibrations[key]
                shot = replace(shot, values={**shot.values, "window": (choice["start"], choice["stop"])})
            shots.append(shot)
        self.job = replace(self.job, shots=tuple(shots))

    def _check_composed(self, shot, errors: list[str]) -> None:
        try:
            for component, model in require_denoisers(self.pipe).items():
                check_denoiser(component, model)
            require_parts(parts_for(self.testbed), shot.values["prompt"])
        except ValueError as err:
            errors.append(f"{shot.where()}, field `extrapolation`: {err}")

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
        elif self.sizable and self.testbed is not None:  # size null: the testbed's own (moving-digits: 16x16)
            own = getattr(self.testbed, "call_kwargs", {})
            kwargs.update({k: v for k, v in own.items() if k in ("height", "width")})
        if self.video:
            kwargs.update(num_frames=o.frames, output_type="np")
        with self._knob(batch[0]):  # a batch is one shot and fidelity: one prompt, one guard reading
            result = self.pipe(**kwargs)
        if self.video:
            return [
                encode_mp4(as_uint8_frames(f)[..., :3], o.fps, self.embedded(x))
                for f, x in zip(result.frames, batch, strict=True)
            ]
        return [self._png(image, x) for image, x in zip(result.images, batch, strict=True)]

    def _knob(self, x: Output):
        """The knob at this output's fidelity (applied once per strength, window and mode); 0 is the untouched model.
        With `guard: detect`, a flagged prompt's outputs are rendered at the job's `guard_fidelity` instead."""
        o = x.options
        f = self.guard_info(x)["rendered_fidelity"] if self.guarded else o.fidelity
        if o.extrapolation == "composed" and f < 0:  # the knob at 0 (if any), the prompt rebuilt from its parts
            stack = contextlib.ExitStack()
            try:
                if get_knob(self.pipe) is not None:
                    stack.enter_context(fidelity(self.pipe, 0.0))
                stack.enter_context(composed(self.pipe, f, parts_for(self.testbed), o.start, o.stop))
            except BaseException:
                stack.close()
                raise
            return stack
        if self.bmap is None:  # a knob someone else applied to a given pipeline must not act
            return fidelity(self.pipe, 0.0) if get_knob(self.pipe) is not None else contextlib.nullcontext()
        if self._applied != (o.strength, o.start, o.stop, o.fidelity_mode):
            apply_knob(self.pipe, self.bmap, strength=o.strength, start=o.start, stop=o.stop,
                       fidelity_mode=o.fidelity_mode)  # fmt: skip
            self._applied = (o.strength, o.start, o.stop, o.fidelity_mode)
        return fidelity(self.pipe, f)

    def close(self) -> None:
        """Remove the knob this renderer applied."""
        if self._applied is not None:
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
        settings = o.settings()
        if settings.get("extrapolation") is None:  # a field added later: unset, the key of an earlier render stays
            settings.pop("extrapolation", None)
        what = {
            "kind": o.kind,
            "settings": settings,
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
    size = getattr(getattr(next(iter(require_denoisers(pipe).values())), "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", 1) if getattr(pipe, "vae", None) is not None else 1
    if isinstance(size, int):
        return (size * scale, size * scale)
    return (size[1] * scale, size[0] * scale) if isinstance(size, (list, tuple)) and len(size) == 2 else None
