"""`Engine`: the app's models, block maps and knob in one object; every request runs under its one lock.

>>> engine = Engine("digits")
>>> runs = engine.render(GenerationOptions(prompt="a seven", seed=1, steps=2, batch_size=2), "digits", "none")
>>> [(s.seed, s.image.size) for s in runs[0].images]
[(1, (16, 16)), (2, (16, 16))]

The knob is state on a shared model (hooks and per-block factors), so a request applies its own map, strength,
window and fidelity, samples, and removes the knob again, all while holding `Engine.lock`: requests with
different settings never see each other's knob, whichever order the server runs them in.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from memctl.blockmap import BlockMap
from memctl.blocks import pipeline_denoisers, require_denoisers
from memctl.composed import composed, parts_for, require_parts
from memctl.detection import detect
from memctl.knob import temporary_knob
from memctl.loading import is_testbed, load_model_and_testbed
from memctl.metadata import provenance
from memctl.options import GenerationOptions, needs_map
from memctl.pipelines import call_parameters
from memctl.probe import probe
from memctl.probeset import ProbeSet
from memctl.signals import screen
from memctl.zoo.testbed import TESTBEDS

NO_MAP = "none"
SHIPPED_MAP = "shipped"
GENERAL_PER_CLASS = 8  # held-out images per class among the general probes of "compute a map here"
DEFAULT_FRAMES = 16  # frames of a video model when the options name none
MAX_MODELS = 2  # loaded pipelines kept in memory (least recently used go first)


@dataclass
class Loaded:
    """One loaded pipeline with what the app knows about it."""

    source: str
    pipe: object
    testbed: object | None = None  # a memctl.zoo Testbed: ground truth for badges and example prompts
    is_video: bool = False

    @property
    def call_parameters(self) -> set[str]:
        return set(call_parameters(self.pipe))  # custom pipelines too: FidelityMixin forwards **kwargs

    @property
    def denoiser(self):
        """The first denoiser (`unet`, `transformer`); Wan 2.2's `transformer_2` is in `denoisers`."""
        return next(iter(self.denoisers.values()), None)

    @property
    def denoisers(self) -> dict:
        return pipeline_denoisers(self.pipe)


@dataclass
class Sample:
    """One generated image (or a video's first frame) and the settings that reproduce it."""

    image: object  # PIL image at the model's native size
    seed: int
    fidelity: float
    settings: dict  # the `memctl` PNG text chunk
    parameters: str  # the A1111-style `parameters` PNG text chunk
    frames: list | None = None  # all frames, for video models


@dataclass
class Run:
    """The samples of one fidelity value."""

    fidelity: float
    images: list[Sample] = field(default_factory=list)


class Cancelled(Exception):
    """Raised inside a long job (computing a map) when the user pressed Cancel."""


class Engine:
    """Holds the loaded models and block maps; `render` and `compute_map` serialize on `lock`."""

    def __init__(self, default_model: str = "digits", allow_hub: bool = False):
        self.default_model = str(default_model)
        self.allow_hub = allow_hub
        self.lock = threading.RLock()  # held while the knob is on a model: sampling and probing
        self._registry_lock = threading.RLock()  # the caches of models and maps (never held while sampling/loading)
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}  # source -> held while that source loads (one download each)
        self._maps: dict[str, object] = {}  # label -> BlockMap (labels are unique per app)

    # ------------------------------------------------------------------------------------------------------------
    # models

    def model(self, source: str | None = None, allow_hub: bool | None = None) -> Loaded:
        """The pipeline for `source`: an embedded testbed name, a local folder, or a hub id.

        Hub ids download only when the server allows it (`Engine(allow_hub=True)`, `memctl ui --allow-hub`) and the
        request does not say no: a request can narrow what the server allows, never widen it. Loading happens
        outside the registry lock, so other requests go on meanwhile (one load per source at a time)."""
        source = (source or self.default_model).strip()
        allow = self.allow_hub and (allow_hub is None or bool(allow_hub))
        with self._registry_lock:
            if source in self._models:
                self._models.move_to_end(source)
                return self._models[source]
            loading = self._loading.setdefault(source, threading.Lock())
        with loading:
            try:
                with self._registry_lock:
                    if source in self._models:  # another request loaded it while this one waited
                        return self._models[source]
                loaded = _load(source, allow, server_allows=self.allow_hub)
                with self._registry_lock:
                    self._models[source] = loaded
                    while len(self._models) > MAX_MODELS:
                        self._models.popitem(last=False)
                    return loaded
            finally:
                with self._registry_lock:
                    if self._loading.get(source) is loading:
                        del self._loading[source]

    def cached(self, source: str | None = None) -> Loaded | None:
        """The pipeline for `source` if it is loaded already, else None (never loads)."""
        with self._registry_lock:
            return self._models.get((source or self.default_model).strip())

    # ------------------------------------------------------------------------------------------------------------
    # block maps

    def map_labels(self) -> list[str]:
        with self._registry_lock:
            return [NO_MAP, SHIPPED_MAP, *self._maps]

    def add_map(self, label: str, bmap) -> str:
        """Register `bmap` under `label` (made unique) and return the label used."""
        with self._registry_lock:
            unique, n = label, 2
            while unique in self._maps or unique in (NO_MAP, SHIPPED_MAP):
                unique, n = f"{label} ({n})", n + 1
            self._maps[unique] = bmap
            return unique

    def forget_map(self, label: str) -> None:
        with self._registry_lock:
            self._maps.pop(label, None)

    def load_map_file(self, path: str | Path) -> str:
        """Load a block map file and register it; errors say what the file should have been."""

        path = Path(path)
        try:
            bmap = BlockMap.load(path)  # its errors say what a map file should be
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:
            raise ValueError(
                f"Expected a block map saved by `BlockMap.save` (.safetensors), but {path.name!r} "
                f"could not be read ({type(err).__name__}: {err})."
            ) from err
        return self.add_map(f"file: {path.name}", bmap)

    def block_map(self, label: str | None, loaded: Loaded):
        """The map registered as `label` checked against `loaded`'s denoiser; None for "none"."""
        label = label or NO_MAP
        if label == NO_MAP:
            return None
        if label == SHIPPED_MAP:
            if loaded.testbed is None:
                raise ValueError(
                    f"Expected an embedded model for the shipped block map, but {loaded.source!r} "
                    "ships none. Load a map file or compute one."
                )
            bmap = loaded.testbed.block_map()
        else:
            with self._registry_lock:
                bmap = self._maps.get(label)
            if bmap is None:
                raise ValueError(f"Expected a block map among {self.map_labels()}, but got {label!r}.")
        _check_map(bmap, loaded)
        return bmap

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    def render(
        self,
        opts: GenerationOptions,
        source: str | None,
        map_label: str | None,
        fidelities: tuple[float, ...] | None = None,
    ) -> list[Run]:
        """Sample `opts` (seeds `opts.seed … + batch_size - 1`) once per fidelity, same seeds each time."""
        fidelities = (opts.fidelity,) if fidelities is None else fidelities
        loaded = self.model(source)
        bmap = self.block_map(map_label, loaded)
        moved = [f for f in fidelities if needs_map(f, opts.extrapolation)]
        if bmap is None and moved:
            raise ValueError(
                f"Expected a block map for fidelity {moved[0]:+g} (at 0 none is needed), but the block "
                "map is 'none'. Choose the shipped map, load a file or compute one."
            )
        with self.lock:
            runs = []
            for f in fidelities:
                with self._knob(loaded, bmap, replace(opts, fidelity=f)):
                    runs.append(Run(f, self._sample(loaded, replace(opts, fidelity=f), map_label, bmap)))
            return runs

    @contextmanager
    def _knob(self, loaded: Loaded, bmap, opts: GenerationOptions):
        if opts.extrapolation == "composed" and opts.fidelity < 0:  # no knob: the prompt rebuilt from its parts
            parts = parts_for(loaded.testbed)
            require_parts(parts, opts.prompt)
            with composed(loaded.pipe, opts.fidelity, parts, opts.start, opts.stop):
                yield
            return
        if bmap is None:
            yield
            return
        with temporary_knob(loaded.pipe, opts.fidelity, bmap, opts.start, opts.stop, strength=opts.strength,
                            fidelity_mode=opts.fidelity_mode):  # fmt: skip
            yield

    def calibrated_window(self, source: str | None, steps: int, guidance: float) -> dict:
        """`memctl.composed.calibrate_window` for this model at these sampling settings, on its testbed's memorized
        probe pairs (`memctl.effect.testbed_window`); other models are refused (their memorized pairs are the
        user's own: calibrate in Python)."""
        from memctl.effect import testbed_window

        loaded = self.model(source)
        if loaded.testbed is None:
            raise ValueError(
                f"Expected an embedded testbed to calibrate the composed window on (its memorized canaries), but got "
                f"{loaded.source!r}. Set the window by hand, or run memctl.composed.calibrate_window in Python on "
                "your own memorized (prompt, image) pairs."
            )
        with self.lock:
            return testbed_window(loaded.pipe, loaded.testbed, steps, guidance)

    def _sample(self, loaded: Loaded, opts: GenerationOptions, map_label: str | None, bmap) -> list[Sample]:
        seeds = [opts.seed + i for i in range(opts.batch_size)]
        kwargs = dict(
            num_inference_steps=opts.steps,
            guidance_scale=opts.guidance,
            output_type="pil",
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        )
        if "num_images_per_prompt" in loaded.call_parameters:
            kwargs.update(
                prompt=opts.prompt, negative_prompt=opts.negative_prompt or None, num_images_per_prompt=opts.batch_size
            )
        else:  # e.g. TextToVideoSDPipeline: one prompt per sample
            kwargs.update(
                prompt=[opts.prompt] * opts.batch_size,
                negative_prompt=[opts.negative_prompt] * opts.batch_size if opts.negative_prompt else None,
            )
        own = getattr(loaded.testbed, "call_kwargs", {})  # a video testbed's size (moving-digits: 9 × 16 × 16)
        kwargs.update({k: v for k, v in own.items() if k in ("height", "width")})
        if loaded.is_video:
            kwargs["num_frames"] = opts.frames or own.get("num_frames", DEFAULT_FRAMES)
        out = loaded.pipe(**kwargs)
        clips = out.frames if loaded.is_video else [[im] for im in out.images]
        extra = {
            "model": loaded.source,
            "block_map": map_label or NO_MAP,
            "block_map_fingerprint": getattr(bmap, "fingerprint", None) if bmap is not None else None,
        }
        samples = []
        for i, (seed, frames) in enumerate(zip(seeds, clips, strict=True)):
            one = replace(opts, seed=seed, batch_size=1)
            settings = {
                **one.to_dict(),
                **extra,
                "batch": {"first_seed": opts.seed, "size": opts.batch_size, "index": i},
                "versions": _provenance(),
            }
            parameters = one.a1111_parameters(model=loaded.source, block_map=extra["block_map"])
            samples.append(
                Sample(
                    list(frames)[0],
                    seed,
                    opts.fidelity,
                    settings,
                    parameters,
                    list(frames) if loaded.is_video else None,
                )
            )
        return samples

    # ------------------------------------------------------------------------------------------------------------
    # prompt-only detection

    def detect(
        self, prompts: list[str], source: str | None, seeds: int = 4, calibrate: bool = True, **kwargs
    ) -> tuple[list, int | None, list]:
        """`memctl.detect` scores of `prompts`, the number of reference prompts (None: scored against each other), and
        `memctl.signals.screen` scores (the default signals, p-value and verdict) against the same reference.

        `calibrate` uses an embedded model's ordinary prompts as the reference; other models have none, so it is
        ignored there. `kwargs` go to `memctl.detect` (`threshold`, `progress`, ...).
        """
        loaded = self.model(source)
        reference = loaded.testbed.ordinary_prompts() if calibrate and loaded.testbed is not None else None
        with self.lock:  # no knob is on while the lock is held: detection reads the untouched model
            scores = detect(loaded.pipe, prompts, seeds=seeds, reference=reference, **kwargs)
            screened = screen(loaded.pipe, prompts, reference or prompts, seeds=seeds)
        return scores, len(reference) if reference else None, screened

    # ------------------------------------------------------------------------------------------------------------
    # computing a map here

    def compute_map(self, source: str | None, cancel: threading.Event) -> str:
        """Probe the model (embedded testbeds: their canaries vs held-out digits); returns the new map's label.

        Raises `Cancelled` when `cancel` is set, `ValueError` for a model that is not an embedded testbed.
        """
        loaded = self.model(source)
        if loaded.testbed is None:
            raise ValueError(
                f"Expected an embedded model (it ships its probe images), but got {loaded.source!r}. "
                "Run `memctl probe MODEL --probes FILE -o MAP` and load the map file."
            )
        probes = _testbed_probes(loaded.testbed)
        with self.lock, _interrupt_on(loaded.denoisers.values(), cancel):
            bmap = probe(loaded.pipe, probes)
        return self.add_map(f"computed: {Path(loaded.source).name} {time.strftime('%H:%M:%S')}", bmap)


def is_embedded(source: str) -> bool:
    """An embedded testbed: a name, or a folder with `testbed.json`."""
    return is_testbed(source)


def _load(source: str, allow_hub: bool, server_allows: bool = True) -> Loaded:
    path = Path(source).expanduser()
    if not is_embedded(source) and not path.is_dir() and not allow_hub:
        how = (
            "tick 'allow hub download'"
            if server_allows
            else "restart the app with --allow-hub (this server does not allow hub downloads) and tick 'allow hub "
            "download'"
        )
        raise ValueError(
            f"Expected an embedded model ({', '.join(sorted(TESTBEDS))}) or a local diffusers folder, "
            f"but got {source!r}, which is neither. To download a hub id, {how}."
        )
    pipe, testbed = load_model_and_testbed(source if source in TESTBEDS or not path.exists() else str(path))
    return _finish(Loaded(source, pipe, testbed))


def _finish(loaded: Loaded) -> Loaded:
    require_denoisers(loaded.pipe)
    if hasattr(loaded.pipe, "set_progress_bar_config"):
        loaded.pipe.set_progress_bar_config(disable=True)
    loaded.is_video = "num_frames" in loaded.call_parameters
    return loaded


def _check_map(bmap: BlockMap, loaded: Loaded) -> None:
    """The map fits each denoiser it covers (Wan 2.2: `transformer` and `transformer_2`)."""
    denoisers = loaded.denoisers
    for component in bmap.fingerprints:
        if component not in denoisers:
            raise ValueError(
                f"Expected a block map for this model's denoisers {sorted(denoisers)}, but it covers {component!r}."
            )
        bmap.check_model(denoisers[component], component=component)


def _testbed_probes(tb) -> ProbeSet:
    """Memorized: each canary prompt with its bound image; general: held-out images under ordinary prompts."""
    images, classes = tb.held_out
    per_class: dict[int, int] = {}
    general = []
    for image, c in zip(images, classes.tolist(), strict=True):
        per_class[c] = per_class.get(c, 0) + 1
        if per_class[c] <= GENERAL_PER_CLASS:
            general.append((tb.prompt(int(c)), image))
    return ProbeSet(memorized=[(p, image) for p, image, _, _ in tb.canaries], general=general)


@contextmanager
def _interrupt_on(denoisers, cancel: threading.Event):
    """Make the next call of any of `denoisers` raise `Cancelled` once `cancel` is set; the hooks always come off."""

    def check(module, args):
        if cancel.is_set():
            raise Cancelled("Cancelled by the user.")

    handles = [d.register_forward_pre_hook(check) for d in denoisers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_PROVENANCE: dict | None = None


def _provenance() -> dict:
    global _PROVENANCE
    if _PROVENANCE is None:
        _PROVENANCE = provenance()
    return _PROVENANCE
