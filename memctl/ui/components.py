"""The app's components: each group of controls and outputs as a function returning its Gradio components (by
name in a dict where there are many); `memctl.ui.app.create_demo` lays them out and wires them to the handlers.
"""

from __future__ import annotations

from dataclasses import replace

import gradio as gr

from memctl.attention_guidance import DEFAULT_FIDELITY_MODE, FIDELITY_MODES
from memctl.options import GenerationOptions
from memctl.ui.canaries import Opening
from memctl.ui.controls import LIMITS
from memctl.ui.detect import DATATYPES, EMPTY_TABLE, MAX_SEEDS, MIN_SEEDS
from memctl.ui.engine import NO_MAP, SHIPPED_MAP, Engine
from memctl.ui.handlers import Handlers
from memctl.zoo.testbed import TESTBEDS

DEFAULTS = GenerationOptions(prompt="a seven")


def slider(*args, **kwargs) -> gr.Slider:
    """A `gr.Slider` that leaves range checks to `GenerationOptions`, whose errors name the field."""
    return unchecked(gr.Slider(*args, **kwargs))


def unchecked(component):
    """`component` passing its value on as it came, for the handler to check (and name the field in its error).

    Gradio's own check answers an API call with only "Value 2 is greater than maximum value 1", and `gr.Number`
    rounds to its precision without a word. (Overriding `preprocess` on the instance, not in a subclass: Gradio
    writes a .pyi file next to any component subclass.)
    """
    component.preprocess = lambda payload: payload
    return component


def model_controls(engine: Engine):
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


def map_controls(engine: Engine):
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
        bake_btn = gr.Button("Bake at this fidelity", size="sm", elem_id="bake")
        bake_file = gr.File(label="Baked denoiser (.safetensors)", interactive=False, height=80, elem_id="bake-file")
    return map_choice, map_file, compute_btn, cancel_btn, map_status, bake_btn, bake_file


def defaults(first: Opening | None) -> GenerationOptions:
    """The controls' first values: the opening canary at its fixed seeds, else `DEFAULTS`."""
    if first is None:
        return DEFAULTS
    return replace(DEFAULTS, prompt=first.prompt, seed=first.seed, batch_size=first.batch_size)


def prompt_controls(d: GenerationOptions) -> dict:
    c = {}
    c["prompt"] = gr.Textbox(d.prompt, label="Prompt", lines=1, elem_id="prompt")
    c["fidelity"] = slider(
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


def sampling_controls(d: GenerationOptions) -> dict:
    c = {}
    c["negative"] = gr.Textbox(d.negative_prompt, label="Negative prompt", lines=1)
    with gr.Accordion("Knob: strength, noise-level window, fidelity (+) mode, fidelity (−) lever", open=False):
        c["strength"] = slider(0, 4, d.strength, step=0.05, label="Strength")
        with gr.Row():
            c["start"] = slider(0, 1, d.start, step=0.05, label="Window start (noise level)")
            c["stop"] = slider(0, 1, d.stop, step=0.05, label="Window stop (noise level)")
        c["fidelity_mode"] = gr.Dropdown(
            list(FIDELITY_MODES),
            value=d.fidelity_mode or DEFAULT_FIDELITY_MODE,
            label="Fidelity (+) mode",
            info="cached: 1.1 denoiser passes per step; guidance: 2 (exact); attention: about 1, weaker",
            elem_id="fidelity-mode",
        )
        c["extrapolation"] = gr.Dropdown(
            ["map", "composed"],
            value=d.extrapolation or "map",
            label="Fidelity (−) lever",
            info="map: the block map's pull (no extra pass); composed: the prompt rebuilt from its comma-separated "
            "parts ('a two, small, bold'), no map, one more pass per part, inside the window",
            elem_id="extrapolation",
        )
        c["calibrate_window"] = gr.Button("Calibrate the window for composed", size="sm", elem_id="calibrate-window")
        c["window_status"] = gr.Markdown(
            "Embedded testbeds: the narrowest high-noise window where composing stops the memorized probes "
            "copying, at the current steps and guidance.",
            elem_id="window-status",
        )
    with gr.Row():
        c["seed"] = gr.Number(d.seed, label="Seed (−1 = random)", precision=None, elem_id="seed", scale=3)
        c["random"] = gr.Button("random", size="sm", scale=0, min_width=70)
        c["reuse"] = gr.Button("reuse", size="sm", scale=0, min_width=70)
        c["seed_used"] = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used", scale=2)
    with gr.Row():
        c["steps"] = slider(*LIMITS["steps"], d.steps, step=1, label="Steps", elem_id="steps")
        c["guidance"] = slider(*LIMITS["guidance"], d.guidance, step=0.5, label="Guidance")
        c["batch"] = slider(*LIMITS["batch_size"], d.batch_size, step=1, label="Batch size", elem_id="batch")
    with gr.Row():
        c["frames"] = slider(*LIMITS["frames"], 16, step=1, label="Frames (video models)", visible=False)
        c["fps"] = slider(*LIMITS["fps"], 8, step=1, label="FPS (video models)", visible=False)
    with gr.Accordion("Presets (JSON)", open=False):
        with gr.Row():
            c["preset_save"] = gr.Button("Save preset", size="sm")
            c["preset_load"] = gr.UploadButton("Load preset", file_types=[".json"], size="sm")
        c["preset_file"] = gr.File(label="Saved preset", interactive=False, height=80)
    return c


def examples_view():
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


def bound_view(h: Handlers, first: Opening | None):
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


def outputs(first: Opening | None) -> dict:
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
            o["ab_video"] = gr.Image(label="Clips: A (fidelity 0) | B (current)", visible=False, format="gif",
                                     height=200, elem_id="ab-video")  # fmt: skip
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
        o.update(detect_tab())
    return o


def detect_tab() -> dict:
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
            d["seeds"] = unchecked(
                gr.Number(
                    4,
                    label="Seeds",
                    minimum=MIN_SEEDS,
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


def shown():
    return gr.update(visible=True)


def hidden():
    return gr.update(visible=False)
