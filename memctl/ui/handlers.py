"""What the app's buttons do: turn control values into `GenerationOptions`, run the `Engine`, shape outputs.

>>> handlers = Handlers(Engine("digits"), out_dir="out/ui")                      # doctest: +SKIP
>>> gallery, badges_html, seed_used, video = handlers.generate("a seven", "", 0.0, 1.0, 0.0, 1.0, 7, 10, 1.0, 2,
...                                                              None, None, "digits", "none")  # doctest: +SKIP

Each handler raises `gr.Error` with the validation message of `GenerationOptions` (or the engine) on bad input,
so a client sees what was expected and the app stays up. Outputs are PNG files written with `memctl.metadata`
(the A1111-style `parameters` and the JSON `memctl` text chunks), handed to Gradio as paths so nothing re-encodes
them.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import gradio as gr

from memctl.detection import THRESHOLD  # risk above which `memctl.detect` flags a prompt
from memctl.metadata import save_png
from memctl.options import GenerationOptions
from memctl.ui import badges as badge_lib
from memctl.ui import baking, canaries
from memctl.ui import detect as detect_view
from memctl.ui.controls import Controls, fail, integer, is_random, small_upload, takes_controls, user_errors
from memctl.ui.engine import DEFAULT_FRAMES, NO_MAP, SHIPPED_MAP, Cancelled, Engine, Loaded, Sample, is_embedded
from memctl.ui.heatmap import draw_heatmap, from_block_map
from memctl.ui.views import SWEEP, badges_html, enlarge, fidelity_label, model_info, side_by_side, sweep_sheet
from memctl.video import export_gif

DEFAULT_FPS = 8
MAX_MAP_BYTES = 512 * 2**20  # an uploaded block map (a condition map of a large model is tens of MB)
MAX_PRESET_BYTES = 2**20
MAX_UPLOAD = "512mb"  # Gradio's own cap on any upload (`launch(max_file_size=...)`)


class Handlers:
    """The app's event handlers over one `Engine`; outputs are written under `out_dir`."""

    def __init__(self, engine: Engine, out_dir: str | Path | None = None):
        self.engine = engine
        self._served = tempfile.TemporaryDirectory(prefix="memctl-ui-")  # removed on close() or at exit
        self.served_dir = Path(self._served.name)  # what Gradio may hand out: only files this app wrote
        self.out_dir = Path(out_dir) if out_dir else self.served_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()
        self._cancel: dict[str, threading.Event] = {}  # session -> its running "compute a map here"; then removed

    def close(self) -> None:
        """Remove the app's temporary folder (the files under `out_dir`, if one was given, stay)."""
        self._served.cleanup()

    def _serve(self, path: Path, name: str | None = None) -> str:
        """`path` (written under `out_dir`) as a file Gradio may serve: a link to it in the app's temporary folder,
        named `name` (default: its own name).

        Gradio then serves its cached copy, so `launch()` needs no `allowed_paths` and nothing else under `--out`
        can be downloaded."""
        path = Path(path)
        if path.parent == self.served_dir:
            return str(path)
        served = self.served_dir / (name or path.name)
        try:
            os.link(path, served)
        except OSError:  # another file system
            shutil.copyfile(path, served)
        return str(served)

    # ------------------------------------------------------------------------------------------------------------
    # options

    def options(self, *values, video: bool = False) -> GenerationOptions:
        """Validated options within the app's `LIMITS` from the control values in order (see `Controls`)."""
        return Controls(*values).options(video)

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    @user_errors
    @takes_controls("model", "map_label")
    def generate(self, c: Controls, model, map_label):
        """Gallery of (png path, caption), badges html, seed used, video path (video models)."""
        opts = c.options(self._is_video(model))
        run = self.engine.render(opts, model, map_label)[0]
        loaded = self.engine.model(model)
        captions = self._captions(loaded, opts.prompt, run.images, [f"seed {s.seed}" for s in run.images])
        gallery = [(self._save(s), text) for s, (text, _) in zip(run.images, captions, strict=True)]
        return gallery, badges_html(captions), str(opts.seed), self._video(run.images, opts)

    @user_errors
    @takes_controls("model", "map_label")
    def sweep(self, c: Controls, model, map_label):
        """The same seeds at fidelity −1, −0.5, 0, 0.5, 1: one row per seed, one column per fidelity."""
        opts = c.options(self._is_video(model))
        runs = self.engine.render(opts, model, map_label, fidelities=SWEEP)
        loaded = self.engine.model(model)
        rows = [[run.images[i] for run in runs] for i in range(opts.batch_size)]  # (seeds, fidelities)
        cells = [s for row in rows for s in row]
        captions = self._captions(
            loaded, opts.prompt, cells, [f"fidelity {s.fidelity:+.1f} · seed {s.seed}" for s in cells]
        )
        gallery = [(self._save(s), fidelity_label(s.fidelity)) for s in cells]  # short: a gallery cell is narrow
        return sweep_sheet(rows, captions), gallery, badges_html(captions), str(opts.seed)

    @user_errors
    @takes_controls("model", "map_label")
    def compare(self, c: Controls, model, map_label):
        """A/B: the first seed at fidelity 0 (left) and at the current fidelity (right)."""
        opts = replace(c, batch=1).options(self._is_video(model))
        base, current = self.engine.render(opts, model, map_label, fidelities=(0.0, opts.fidelity))
        loaded = self.engine.model(model)
        pair = [base.images[0], current.images[0]]
        captions = self._captions(loaded, opts.prompt, pair, ["A: fidelity 0", f"B: fidelity {opts.fidelity:+.2f}"])
        for s in pair:
            self._save(s)
        clips = self._ab_video(pair, opts)
        ab_video = gr.update(value=clips, visible=clips is not None)
        return (enlarge(pair[0].image), enlarge(pair[1].image)), badges_html(captions), str(opts.seed), ab_video

    def _ab_video(self, pair: list[Sample], opts: GenerationOptions) -> str | None:
        """A video model's A/B: clip A (fidelity 0) and clip B side by side in one GIF, frame by frame."""
        if pair[0].frames is None:
            return None
        frames = [side_by_side(enlarge(a), enlarge(b)) for a, b in zip(pair[0].frames, pair[1].frames, strict=True)]
        path = self.out_dir / f"{next(self._counter):05d}-seed{pair[0].seed}-ab.gif"
        return self._serve(export_gif(frames, path, fps=opts.fps or DEFAULT_FPS))

    def _captions(self, loaded: Loaded, prompt: str, samples: list[Sample], heads: list[str]) -> list[tuple]:
        """Per sample: (caption, badge or None); an embedded model's captions add the copy / novelty badge."""
        if loaded.testbed is None:
            return [(h, None) for h in heads]
        marks = badge_lib.badges(loaded.testbed, [s.frames or s.image for s in samples], prompt)  # clips whole
        return [(f"{h} · {b.text}", b) for h, b in zip(heads, marks, strict=True)]

    def _save(self, sample: Sample) -> str:
        path = self.out_dir / f"{next(self._counter):05d}-seed{sample.seed}-fid{sample.fidelity:+.2f}.png"
        save_png(sample.image, path, sample.settings, sample.parameters)
        return self._serve(path)

    def _video(self, samples: list[Sample], opts: GenerationOptions) -> str | None:
        if not samples or samples[0].frames is None:
            return None
        path = self.out_dir / f"{next(self._counter):05d}-seed{samples[0].seed}.gif"
        frames = [enlarge(f) for f in samples[0].frames]  # display copy; the PNG keeps the native first frame
        return self._serve(export_gif(frames, path, fps=opts.fps or DEFAULT_FPS))

    def _is_video(self, model) -> bool:
        try:
            return self.engine.model(model).is_video
        except ValueError:
            return False

    @user_errors
    @takes_controls("model", "map_label")
    def bake(self, c: Controls, model, map_label):
        """The map at the current fidelity written into a copy of the weights: status text, the denoiser file."""
        opts = c.options(self._is_video(model))
        folder = (
            self.out_dir / "baked" / f"{next(self._counter):05d}-f{opts.fidelity:+.2f}_strength{opts.strength:.2f}"
        )
        folder, info = baking.bake_copy(self.engine, opts, model, map_label, folder)
        single = self._serve(folder / "denoiser.safetensors", f"{folder.name}-denoiser.safetensors")
        return baking.bake_message(folder, info, is_embedded(model)), single

    @user_errors
    @takes_controls("model", "map_label")
    def calibrate_window(self, c: Controls, model, map_label):
        """The composed lever's window for this testbed model at the current steps and guidance
        (`Engine.calibrated_window`): window start and stop, the lever set to composed, what the calibration read."""
        opts = c.options(self._is_video(model))
        choice = self.engine.calibrated_window(model, opts.steps, opts.guidance)
        rates = ", ".join(f"from {float(k):g}: {100 * v:.0f} %" for k, v in choice["copy_rates"].items())
        test = "near copies of" if choice["copy_test"] == "nearest" else "copies of"
        verdict = "" if choice["reached"] else " None reached 5 %: the widest window is set."
        text = (
            f"Window **[{choice['start']:g}, {choice['stop']:g}]** (steps {opts.steps}, guidance {opts.guidance:g}): "
            f"the narrowest where composing at −1 leaves at most 5 % {test} the memorized probes' own images "
            f"(seeds {', '.join(map(str, choice['seeds']))}; {rates}).{verdict}"
        )
        return choice["start"], choice["stop"], "composed", text

    # ------------------------------------------------------------------------------------------------------------
    # model and examples

    @user_errors
    def load_model(self, model, allow_hub):
        """Model info, example prompts, video controls' visibility, the preselected map and its heat-map."""
        loaded = self.engine.model(model, allow_hub=bool(allow_hub))
        label = SHIPPED_MAP if _has_shipped_map(loaded) else NO_MAP
        picture, table, info = self.map_view(label, model)
        video = gr.update(visible=loaded.is_video)
        own = getattr(loaded.testbed, "call_kwargs", {})  # a video testbed's clip length is the one it was trained at
        frames = gr.update(visible=loaded.is_video, **({"value": own["num_frames"]} if "num_frames" in own else {}))
        return (
            model_info(loaded),
            gr.Dataset(samples=self.examples(loaded)),
            frames,
            video,
            video,
            gr.Dropdown(choices=self.engine.map_labels(), value=label),
            picture,
            table,
            info,
        )

    def opening(self) -> canaries.Opening | None:
        """The canary the first screen sweeps, when the default model is an embedded one (loaded here); else None
        (a model that fails to load says why when the page opens)."""
        if not is_embedded(self.engine.default_model):
            return None
        try:
            return canaries.opening(self.engine.model().testbed)
        except (ValueError, OSError):
            return None

    def examples(self, loaded: Loaded) -> list[list]:
        """`[prompt, kind, bound image path or None]` rows: canaries first (most exposed first), then ordinary."""
        return canaries.examples(loaded.testbed, self.served_dir)

    @user_errors
    def select_example(self, index, model):
        """The clicked example's prompt (its bound image follows from `bound_view`)."""
        return self.examples(self.engine.model(model))[int(index)][0]

    def bound_view(self, prompt, model):
        """Beside the results: a canary prompt's bound training image (hidden for other prompts).

        Reads only a model already loaded: typing in the prompt box never loads one (or fails on a typed path)."""
        loaded = self.engine.cached(model)
        path, text = canaries.bound_of(loaded.testbed if loaded else None, str(prompt or ""), self.served_dir)
        return gr.update(visible=path is not None), None if path is None else str(path), text

    # ------------------------------------------------------------------------------------------------------------
    # block maps

    @user_errors
    def map_view(self, label, model):
        """Heat-map picture, table and a summary of the map `label` for `model`."""
        bmap = self.engine.block_map(label, self.engine.model(model)) if label else None
        if bmap is None:
            return (
                None,
                {"headers": ["block", "score"], "data": [["(no block map)", ""]]},
                "No block map: fidelity must be 0. Choose the shipped map, load a file or compute one.",
            )
        grid = from_block_map(bmap)
        headers, rows = grid.table()
        return (
            draw_heatmap(grid),
            {"headers": headers, "data": rows},
            f"Map **{label}**: {len(grid.names)} blocks × {len(grid.levels)} noise levels. Select a row or a cell.",
        )

    @user_errors
    def select_block_in_table(self, label, model, evt: gr.SelectData):
        """Name and scores of the block in the selected table row."""
        return self._select_block(label, model, lambda grid: evt.index[0])

    @user_errors
    def select_block_in_picture(self, label, model, evt: gr.SelectData):
        """Name and scores of the block under a click on the heat-map."""
        return self._select_block(label, model, lambda grid: grid.row_at(draw_heatmap(grid), y=evt.index[1]))

    def _select_block(self, label, model, row_of):
        bmap = self.engine.block_map(label, self.engine.model(model))
        if bmap is None:
            return None, "No block map selected."
        grid = from_block_map(bmap)
        row = row_of(grid)
        if row is None or not 0 <= row < len(grid.names):
            return gr.update(), "Click on a block's row."
        return draw_heatmap(grid, selected=row), grid.describe(row)

    @user_errors
    def upload_map(self, file, model):
        """Load a block map file, check it fits the model, select it."""
        if not file:
            raise ValueError("Expected a block map file (.safetensors), but got none.")
        label = self.engine.load_map_file(small_upload(file, MAX_MAP_BYTES, "a block map file (.safetensors)"))
        try:
            picture, table, info = self.map_view(label, model)
        except gr.Error:
            self.engine.forget_map(label)
            raise
        return gr.Dropdown(choices=self.engine.map_labels(), value=label), picture, table, info

    def compute_map(self, model, request: gr.Request, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        """Probe the model here (progress shown; Cancel stops it at the next denoiser call)."""
        session = _session(request)
        cancel = self._cancel.setdefault(session, threading.Event())
        cancel.clear()
        progress(0, desc="probing the model")
        try:
            label = self.engine.compute_map(model, cancel)
        except Cancelled:
            return gr.update(), "Computing the map was cancelled; nothing changed.", gr.update(), gr.update()
        except (ValueError, TypeError) as err:
            raise gr.Error(str(err), print_exception=False) from err
        finally:
            if self._cancel.get(session) is cancel:
                del self._cancel[session]  # only running computations have an entry
        picture, table, info = self.map_view(label, model)
        return gr.Dropdown(choices=self.engine.map_labels(), value=label), f"Computed **{label}**.", picture, table

    def cancel_compute(self, request: gr.Request):
        event = self._cancel.get(_session(request))
        if event is not None:
            event.set()
        return "Cancelling…"

    # ------------------------------------------------------------------------------------------------------------
    # prompt-only detection

    @user_errors
    def detect(self, prompts, calibrate, seeds, model, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        """Score the prompts (one per line) for memorization risk: a table, highest risk first, and a summary."""
        prompts = detect_view.parse_prompts(prompts)
        low, high = detect_view.MIN_SEEDS, detect_view.MAX_SEEDS
        expected = f"an int in [{low}, {high}] (the verdict's {low} signals take one seed each, in turn)"
        n_seeds = integer(seeds, "seeds", expected)
        if not low <= n_seeds <= high:
            fail("seeds", expected, seeds)
        progress(0, desc="scoring prompts")
        scores, reference, screened = self.engine.detect(
            prompts, model, n_seeds, calibrate=bool(calibrate), threshold=THRESHOLD, progress=True
        )
        note = (
            ""
            if reference or not calibrate
            else (" *Calibration was ignored: only embedded models ship ordinary prompts.*")
        )
        table = detect_view.score_table(scores, screened)
        return table, detect_view.summary(scores, reference, THRESHOLD, note, screened)

    @user_errors
    def detect_defaults(self, model):
        """After a model loads: an embedded model's example prompts with calibration on; any other model keeps the
        typed prompts, with calibration off (it ships no ordinary prompts)."""
        tb = self.engine.model(model).testbed
        if tb is None:
            return gr.update(), gr.Checkbox(
                value=False,
                interactive=False,
                info="Only embedded models ship ordinary prompts: risk is measured against the scored prompts.",
            )
        return detect_view.default_prompts(tb), gr.Checkbox(
            value=True,
            interactive=True,
            info=(f'Risk against this model\'s {len(tb.ordinary_prompts())} ordinary prompts ("a seven", …).'),
        )

    # ------------------------------------------------------------------------------------------------------------
    # presets

    @user_errors
    @takes_controls("model", "seed_used")
    def save_preset(self, c: Controls, model, seed_used):
        """A JSON file of `GenerationOptions.to_dict()`; a random seed is saved as the seed last used."""
        if is_random(c.seed):
            if not str(seed_used or "").strip():
                raise ValueError(
                    "Expected a fixed seed in a preset (presets reproduce images), but the seed is "
                    "random and nothing was generated yet. Set a seed or generate once."
                )
            c = replace(c, seed=int(seed_used))
        opts = c.options(self._is_video(model))
        path = self.out_dir / f"preset-{next(self._counter):05d}.json"
        path.write_text(json.dumps(opts.to_dict(), indent=1))
        return self._serve(path)

    @user_errors
    def load_preset(self, file):
        """Control values from a preset JSON file (as `save_preset` writes)."""
        if not file:
            raise ValueError("Expected a preset file (.json), but got none.")
        path = Path(small_upload(file, MAX_PRESET_BYTES, "a preset file (.json)"))
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"Expected a preset JSON file, but {path.name!r} is not JSON ({err}).") from err
        if not isinstance(data, dict):
            raise ValueError(f"Expected a JSON object of generation options, but got {type(data).__name__}.")
        o = GenerationOptions.from_dict(data)
        return Controls.showing(o, DEFAULT_FRAMES, DEFAULT_FPS).values()


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _has_shipped_map(loaded: Loaded) -> bool:
    if loaded.testbed is None:
        return False
    return (Path(loaded.testbed.path) / "blockmap.safetensors").is_file()


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"
