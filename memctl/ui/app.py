"""The memctl Gradio app: `create_demo()` builds the layout over one `Engine`; `launch()` serves it on 127.0.0.1.

>>> demo = create_demo(Engine("digits"))   # doctest: +SKIP
>>> launch(demo, port=7860)                # doctest: +SKIP

From the shell: `memctl ui [--model digits] [--host 127.0.0.1] [--port 7860] [--share] [--allow-hub]`, or
`python -m memctl.ui` with the same flags (`memctl/ui/cli.py`). Binding another host or sharing are explicit opt-ins.
"""

from __future__ import annotations

from dataclasses import replace

import gradio as gr

from memctl.defaults import HOST, PORT
from memctl.options import GenerationOptions
from memctl.ui.canaries import Opening
from memctl.ui.detect import DATATYPES, EMPTY_TABLE, MAX_SEEDS
from memctl.ui.engine import NO_MAP, SHIPPED_MAP, Engine
from memctl.ui.handlers import LIMITS, MAX_UPLOAD, Handlers
from memctl.zoo.testbed import TESTBEDS

DEFAULTS = GenerationOptions(prompt="a seven")
HEADER = (
    "# memctl: copy or invent\nSome prompts make a model reproduce a training image. Slide left for a new "
    "image, right for a faithful copy."
)
HOW = """The app opens on a **canary**: a prompt that the small embedded digits model saw many times with one and
the same training image, so it learned to copy that image. The Sweep tab renders the same seeds at five fidelity
values; the badges under it say, for each image, whether it copies a training image or is a new digit of the
asked class.

- **Fidelity** 0 leaves the model untouched; below 0 pushes it away from what it memorized (new images), above 0
  towards it (faithful recall). It needs a **block map** (the embedded model ships one).
- A block map scores each block of the denoiser: red blocks carry memorization, blue ones generalization. The knob
  scales the red blocks' contribution; fidelity > 0 costs one extra denoiser pass per step with the shipped maps.
- Your own diffusers pipeline works too (type its folder in *Model*); badges then need the embedded testbed's
  ground truth, so they show only for embedded models.
"""
CSS = """
.memctl-pixels img { image-rendering: pixelated; }
.memctl-caption { font-size: 12px; margin: 2px 0; }
#sweep-gallery .thumbnail-item img, #gallery .thumbnail-item img { object-fit: contain !important; }
#examples img { object-fit: contain !important; image-rendering: pixelated; }
#gallery .thumbnail-lg .caption-label { display: none; }  /* cut off in a grid cell; the badges below say it all */
#gallery .fixed-height, #sweep-gallery .fixed-height { min-height: 0 !important; }  /* no blank box under a row */
#sweep-gallery .grid-container { grid-template-columns: repeat(5, minmax(40px, 1fr)) !important; }
"""


def _slider(*args, **kwargs) -> gr.Slider:
    """A `gr.Slider` that leaves range checks to `GenerationOptions`, whose errors name the field."""
    return _unchecked(gr.Slider(*args, **kwargs))


def _unchecked(component):
    """`component` passing its value on as it came, for the handler to check (and name the field in its error).

    Gradio's own check answers an API call with only "Value 2 is greater than maximum value 1", and `gr.Number`
    rounds to its precision without a word. (Overriding `preprocess` on the instance, not in a subclass: Gradio
    writes a .pyi file next to any component subclass.)
    """
    component.preprocess = lambda payload: payload
    return component


def create_demo(engine: Engine | None = None, out_dir: str | None = None) -> gr.Blocks:
    """The app's layout and wiring; `engine` holds the models (default: the embedded "digits")."""
    engine = engine or Engine()
    h = Handlers(engine, out_dir)
    first = h.opening()  # the canary the first screen sweeps (None when the default model has no canaries)
    with gr.Blocks(title="memctl", analytics_enabled=False, fill_width=True) as demo:  # local tool: no telemetry
        gr.Markdown(HEADER, elem_id="header")
        with gr.Accordion("How it works", open=False):
            gr.Markdown(HOW)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                model, allow_hub, load_btn, model_info = _model_controls(engine)
                map_choice, map_file, compute_btn, cancel_btn, map_status = _map_controls(engine)
            with gr.Column(scale=2, min_width=360):
                d = _defaults(first)
                c = _prompt_controls(d)
                examples = _examples()  # right under the prompt: the canaries are what the knob is for
                c.update(_sampling_controls(d))
            with gr.Column(scale=3, min_width=420):
                with gr.Row(equal_height=False):
                    bound_col, bound, bound_kind = _bound(h, first)
                    with gr.Column(scale=1, min_width=360):
                        out = _outputs(first)

        controls = [
            c["prompt"],
            c["negative"],
            c["fidelity"],
            c["strength"],
            c["start"],
            c["stop"],
            c["seed"],
            c["steps"],
            c["guidance"],
            c["batch"],
            c["frames"],
            c["fps"],
        ]
        inputs = [*controls, model, map_choice]
        map_outputs = [out["heatmap"], out["table"], out["block_info"]]

        load_outputs = [model_info, examples, c["frames"], c["fps"], out["video"], map_choice, *map_outputs]
        load_event = dict(fn=h.load_model, inputs=[model, allow_hub], outputs=load_outputs)
        detect_defaults = dict(
            fn=h.detect_defaults, inputs=[model], outputs=[out["detect_prompts"], out["calibrate"]], api_name=False
        )
        bound_event = dict(
            fn=h.bound_view,
            inputs=[c["prompt"], model],
            outputs=[bound_col, bound, bound_kind],
            api_name=False,
            queue=False,
        )
        # picking a listed model loads it; a typed path waits for "Load"
        opened = demo.load(**load_event, api_name=False)
        for loaded in (
            load_btn.click(**load_event, api_name="load_model"),
            model.select(**load_event, api_name=False),
            opened,
        ):
            loaded.success(**detect_defaults)
            loaded.success(**bound_event)
        examples.click(h.select_example, [examples, model], [c["prompt"]], api_name=False)
        c["prompt"].change(**bound_event, trigger_mode="always_last")

        map_choice.change(h.map_view, [map_choice, model], map_outputs, api_name="select_map")
        map_file.upload(h.upload_map, [map_file, model], [map_choice, *map_outputs], api_name="load_map")
        compute = compute_btn.click(_shown, None, cancel_btn, api_name=False, queue=False).then(
            h.compute_map,
            [model],
            [map_choice, map_status, out["heatmap"], out["table"]],
            api_name="compute_map",
            concurrency_limit=1,
        )
        compute.then(_hidden, None, cancel_btn, api_name=False, queue=False)  # Cancel shows only while it runs
        # no `cancels=`: the computation stops at its next denoiser call and says so itself (a cancelled event
        # would drop that message and leave "Cancelling…" showing)
        cancel_btn.click(h.cancel_compute, None, [map_status], api_name="cancel_compute", queue=False)
        out["table"].select(
            h.select_block_in_table, [map_choice, model], [out["heatmap"], out["block_info"]], api_name=False
        )
        out["heatmap"].select(
            h.select_block_in_picture, [map_choice, model], [out["heatmap"], out["block_info"]], api_name=False
        )

        run = dict(inputs=inputs, concurrency_limit=4)
        c["generate"].click(
            h.generate,
            outputs=[out["gallery"], out["badges"], c["seed_used"], out["video"]],
            api_name="generate",
            **run,
        )
        sweep_outputs = [out["sweep_sheet"], out["sweep"], out["sweep_badges"], c["seed_used"]]
        c["sweep"].click(h.sweep, outputs=sweep_outputs, api_name="sweep", **run)
        if first is not None:  # the first screen: the opening canary's sweep, computed as the page opens
            opened.success(h.sweep, outputs=sweep_outputs, api_name=False, **run)
        c["ab"].click(h.compare, outputs=[out["ab"], out["ab_badges"], c["seed_used"]], api_name="compare", **run)
        c["random"].click(lambda: -1, None, c["seed"], api_name=False, queue=False)
        c["reuse"].click(
            lambda s: int(s) if str(s).strip() else -1, c["seed_used"], c["seed"], api_name=False, queue=False
        )

        out["score"].click(
            h.detect,
            [out["detect_prompts"], out["calibrate"], out["seeds"], model],
            [out["scores"], out["detect_summary"]],
            api_name="detect",
            concurrency_limit=1,
        )

        c["preset_save"].click(
            h.save_preset, [*controls, model, c["seed_used"]], c["preset_file"], api_name="save_preset"
        )
        c["preset_load"].upload(h.load_preset, c["preset_load"], controls, api_name="load_preset")
    return demo


def _model_controls(engine: Engine):
    with gr.Group():
        names = [n for n in TESTBEDS if n != "digits-s0"]
        choices = names if engine.default_model in names else [engine.default_model, *names]
        model = gr.Dropdown(
            choices,
            value=engine.default_model,
            allow_custom_value=True,
            label="Model",
            info="An embedded model, or type the path of a local diffusers folder.",
        )
        allow_hub = gr.Checkbox(
            False,
            label="Allow hub download (for a hub id)",
            interactive=engine.allow_hub,
            info=None if engine.allow_hub else "Off: the app was started without --allow-hub.",
        )
        load_btn = gr.Button("Load model", size="sm")
        model_info = gr.Markdown(elem_id="model-info")
    return model, allow_hub, load_btn, model_info


def _map_controls(engine: Engine):
    with gr.Group():
        map_choice = gr.Dropdown(
            engine.map_labels(),
            value=NO_MAP,
            allow_custom_value=True,
            label="Block map",
            elem_id="block-map",
            info=f"'{SHIPPED_MAP}' = the embedded model's own map",
        )
        map_file = gr.File(label="Load a block map file", file_types=[".safetensors"], height=80, elem_id="map-file")
        with gr.Row():
            compute_btn = gr.Button("Compute a map here", size="sm")
            cancel_btn = gr.Button("Cancel", size="sm", variant="stop", visible=False)  # shown while computing
        map_status = gr.Markdown(elem_id="map-status")
    return map_choice, map_file, compute_btn, cancel_btn, map_status


def _defaults(first: Opening | None) -> GenerationOptions:
    """The controls' first values: the opening canary at its fixed seeds, else `DEFAULTS`."""
    if first is None:
        return DEFAULTS
    return replace(DEFAULTS, prompt=first.prompt, seed=first.seed, batch_size=first.batch_size)


def _prompt_controls(d: GenerationOptions) -> dict:
    c = {}
    c["prompt"] = gr.Textbox(d.prompt, label="Prompt", lines=1, elem_id="prompt")
    c["fidelity"] = _slider(
        -1,
        1,
        d.fidelity,
        step=0.05,
        label="Fidelity",
        elem_id="fidelity",
        info="−1 = a new image … 0 = the model untouched … +1 = a faithful copy",
    )
    with gr.Row():
        c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
        c["sweep"] = gr.Button("Sweep −1 … +1", elem_id="sweep")
        c["ab"] = gr.Button("A/B: 0 vs current", elem_id="ab")
    return c


def _sampling_controls(d: GenerationOptions) -> dict:
    c = {}
    c["negative"] = gr.Textbox(d.negative_prompt, label="Negative prompt", lines=1)
    with gr.Accordion("Knob: strength and noise-level window", open=False):
        c["strength"] = _slider(0, 4, d.strength, step=0.05, label="Strength")
        with gr.Row():
            c["start"] = _slider(0, 1, d.start, step=0.05, label="Window start (noise level)")
            c["stop"] = _slider(0, 1, d.stop, step=0.05, label="Window stop (noise level)")
    with gr.Row():
        c["seed"] = gr.Number(d.seed, label="Seed (−1 = random)", precision=None, elem_id="seed", scale=3)
        c["random"] = gr.Button("random", size="sm", scale=0, min_width=70)
        c["reuse"] = gr.Button("reuse", size="sm", scale=0, min_width=70)
        c["seed_used"] = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used", scale=2)
    with gr.Row():
        c["steps"] = _slider(*LIMITS["steps"], d.steps, step=1, label="Steps", elem_id="steps")
        c["guidance"] = _slider(*LIMITS["guidance"], d.guidance, step=0.5, label="Guidance")
        c["batch"] = _slider(*LIMITS["batch_size"], d.batch_size, step=1, label="Batch size", elem_id="batch")
    with gr.Row():
        c["frames"] = _slider(*LIMITS["frames"], 16, step=1, label="Frames (video models)", visible=False)
        c["fps"] = _slider(*LIMITS["fps"], 8, step=1, label="FPS (video models)", visible=False)
    with gr.Accordion("Presets (JSON)", open=False):
        with gr.Row():
            c["preset_save"] = gr.Button("Save preset", size="sm")
            c["preset_load"] = gr.UploadButton("Load preset", file_types=[".json"], size="sm")
        c["preset_file"] = gr.File(label="Saved preset", interactive=False, height=80)
    return c


def _examples():
    with gr.Accordion("Example prompts: canaries (memorized on purpose) first", open=True):
        examples = gr.Dataset(
            components=["textbox", "textbox", "image"],
            headers=["prompt", "kind", "bound training image"],
            samples=[["", "", None]],
            type="index",
            label="Click one",
            samples_per_page=8,
            layout="table",
            elem_id="examples",
        )
    return examples


def _bound(h: Handlers, first: Opening | None):
    """Beside the results: the canary's bound training image, to compare with (hidden for other prompts)."""
    shown, path, text = h.bound_view(first.prompt, None) if first is not None else ({"visible": False}, None, "")
    with gr.Column(scale=0, min_width=150, visible=shown["visible"]) as column:
        bound = gr.Image(
            path,
            label="Training image",
            height=140,
            interactive=False,
            format="png",
            buttons=[],
            elem_classes="memctl-pixels",
            elem_id="bound",
        )
        bound_kind = gr.Markdown(text, elem_id="bound-kind", elem_classes="memctl-caption")
    return column, bound, bound_kind


def _outputs(first: Opening | None) -> dict:
    o = {}
    with gr.Tabs(selected="sweep" if first is not None else "images"):
        with gr.Tab("Images", id="images"):
            # square cells whatever the batch (one image stretched to the full width overflowed a fixed height)
            o["gallery"] = gr.Gallery(
                label="Images (PNG with settings)",
                show_label=False,
                format="png",
                columns=4,
                height="auto",
                fit_columns=False,
                object_fit="contain",
                elem_id="gallery",
                elem_classes="memctl-pixels",
                buttons=["download", "fullscreen"],
            )
            o["badges"] = gr.HTML(elem_id="badges")
            o["video"] = gr.Image(label="Video (first clip)", visible=False, format="gif", height=200)
        with gr.Tab("Sweep", id="sweep"):
            gr.Markdown(
                "The same seeds at five fidelity values, from a new image (left) to a faithful copy "
                "(right). Frames: red = a copy of a training image, green = a new, valid image, none = "
                "neither."
            )
            o["sweep_sheet"] = gr.Image(
                label="Sweep",
                show_label=False,
                format="png",
                interactive=False,
                buttons=[],
                elem_id="sweep-sheet",
                elem_classes="memctl-pixels",
            )
            o["sweep_badges"] = gr.HTML(elem_id="sweep-badges")
            o["sweep"] = gr.Gallery(
                label="PNG files",
                show_label=False,
                format="png",
                columns=5,
                height="auto",
                object_fit="contain",
                elem_classes="memctl-pixels",
                elem_id="sweep-gallery",
                buttons=["download", "fullscreen"],
            )
        with gr.Tab("A/B", id="ab"):
            o["ab"] = gr.ImageSlider(
                label="A: fidelity 0 | B: current", format="png", elem_classes="memctl-pixels", elem_id="ab-slider"
            )
            o["ab_badges"] = gr.HTML(elem_id="ab-badges")
        with gr.Tab("Block map", id="map"):
            gr.Markdown(
                "Block scores: a row per block, a column per noise level. Click a row (here or in the "
                "table) to see the block's name and scores."
            )
            o["heatmap"] = gr.Image(
                label="Block map", show_label=False, format="png", interactive=False, elem_id="heatmap"
            )
            o["block_info"] = gr.Markdown(elem_id="block-info")
            o["table"] = gr.Dataframe(label="Scores", interactive=False, max_height=300, elem_id="block-table")
        o.update(_detect_tab())
    return o


def _detect_tab() -> dict:
    d = {}
    with gr.Tab("Detect", id="detect"):
        gr.Markdown(
            "Which prompts make the model copy a training image? Scored from the first denoising steps, no "
            "training data needed: the first-step magnitude (`memctl.detect`), the default signals of "
            "`memctl.signals` and their verdict (memorized / unusual / ordinary)."
        )
        d["detect_prompts"] = gr.Textbox(
            label="Prompts (one per line)",
            lines=6,
            max_lines=16,
            placeholder="a suspected prompt\nan ordinary prompt\n# comments and blank lines are skipped",
            elem_id="detect-prompts",
        )
        with gr.Row():
            d["calibrate"] = gr.Checkbox(
                True, label="Calibrate against the model's ordinary prompts", scale=3, elem_id="calibrate"
            )
            d["seeds"] = _unchecked(
                gr.Number(
                    4,
                    label="Seeds",
                    minimum=2,
                    maximum=MAX_SEEDS,
                    step=1,
                    precision=0,
                    scale=1,
                    min_width=100,
                    elem_id="detect-seeds",
                )
            )
        d["score"] = gr.Button("Score prompts", variant="primary", elem_id="score")
        d["detect_summary"] = gr.Markdown(elem_id="detect-summary")
        d["scores"] = gr.Dataframe(
            EMPTY_TABLE,
            label="Memorization risk, highest first",
            interactive=False,
            datatype=DATATYPES,
            max_height=400,
            elem_id="detect-table",
        )
    return d


def _shown():
    return gr.update(visible=True)


def _hidden():
    return gr.update(visible=False)


def launch(
    demo: gr.Blocks | None = None,
    host: str = HOST,
    port: int | None = PORT,
    share: bool = False,
    block: bool = True,
    quiet: bool = False,
    **kwargs,
):
    """Serve the app (on 127.0.0.1 unless `host` says otherwise); returns Gradio's `(app, local_url, share_url)`.

    Prints the app's own "Running on" line (unless `quiet`) instead of Gradio's, which suggests `share=True` in
    `launch()` where this app's CLI has `--share`."""
    demo = demo or create_demo()
    kwargs.setdefault("show_error", True)  # unexpected errors reach the user as their message, not a generic one
    kwargs.setdefault("max_file_size", MAX_UPLOAD)  # the handlers check each kind's own, smaller, limit too
    result = demo.queue().launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True, css=CSS, **kwargs
    )
    if not quiet and getattr(demo, "local_url", None):
        print(running_line(demo.local_url, share, getattr(demo, "share_url", None)), flush=True)
    if block:
        demo.block_thread()  # what Gradio's own launch() does after it printed its lines
    return result


def running_line(local_url: str, share: bool, share_url: str | None) -> str:
    """The app's address as the CLI prints it.

    >>> running_line("http://127.0.0.1:7860/", False, None)
    'memctl ui: Running on http://127.0.0.1:7860/ (stop with Ctrl-C; memctl ui --share adds a public link)'
    """
    if share_url:
        return f"memctl ui: Running on {local_url} and on the public link {share_url} (stop with Ctrl-C)"
    if share:
        return f"memctl ui: Running on {local_url}; the public link could not be made (see Gradio's message above)"
    return f"memctl ui: Running on {local_url} (stop with Ctrl-C; memctl ui --share adds a public link)"
