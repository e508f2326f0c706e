"""The memctl Gradio app: `create_demo()` builds the layout over one `Engine`; `launch()` serves it on 127.0.0.1.

>>> demo = create_demo(Engine("digits"))   # doctest: +SKIP
>>> launch(demo, port=7860)                # doctest: +SKIP

From the shell: `memctl ui [--model digits] [--host 127.0.0.1] [--port 7860] [--share] [--allow-hub]`, or
`python -m memctl.ui` with the same flags (`memctl/ui/cli.py`). Binding another host or sharing are explicit opt-ins.
"""

from __future__ import annotations

import gradio as gr

from memctl.defaults import HOST, PORT
from memctl.ui.components import (
    bound_view,
    defaults,
    examples_view,
    hidden,
    map_controls,
    model_controls,
    outputs,
    prompt_controls,
    sampling_controls,
    shown,
)
from memctl.ui.engine import Engine
from memctl.ui.handlers import MAX_UPLOAD, Handlers

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
  scales the red blocks' contribution; fidelity > 0 costs an extra denoiser pass on every 10th step with the
  shipped maps (fidelity mode "cached"; "guidance" runs it at every step).
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
                model, allow_hub, load_btn, model_info = model_controls(engine)
                map_choice, map_file, compute_btn, cancel_btn, map_status, bake_btn, bake_file = map_controls(engine)
            with gr.Column(scale=2, min_width=360):
                d = defaults(first)
                c = prompt_controls(d)
                examples = examples_view()  # right under the prompt: the canaries are what the knob is for
                c.update(sampling_controls(d))
            with gr.Column(scale=3, min_width=420):
                with gr.Row(equal_height=False):
                    bound_col, bound, bound_kind = bound_view(h, first)
                    with gr.Column(scale=1, min_width=360):
                        out = outputs(first)

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
            c["fidelity_mode"],
            c["extrapolation"],
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
        compute = compute_btn.click(shown, None, cancel_btn, api_name=False, queue=False).then(
            h.compute_map,
            [model],
            [map_choice, map_status, out["heatmap"], out["table"]],
            api_name="compute_map",
            concurrency_limit=1,
        )
        compute.then(hidden, None, cancel_btn, api_name=False, queue=False)  # Cancel shows only while it runs
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
        ab_outputs = [out["ab"], out["ab_badges"], c["seed_used"], out["ab_video"]]
        c["ab"].click(h.compare, outputs=ab_outputs, api_name="compare", **run)
        bake_btn.click(h.bake, inputs=inputs, outputs=[map_status, bake_file], api_name="bake", concurrency_limit=1)
        c["calibrate_window"].click(
            h.calibrate_window,
            inputs=inputs,
            outputs=[c["start"], c["stop"], c["extrapolation"], c["window_status"]],
            api_name="calibrate_window",
            concurrency_limit=1,
        )
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
