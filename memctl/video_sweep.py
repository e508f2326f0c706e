"""The video fidelity sweep: the most-exposed canaries of a video testbed at fidelity -1, 0, +1, each row beside
the canary's bound training clip, as a frame strip (PNG), an animated GIF and an MP4.

`memctl demo` writes it for the embedded video model (`moving-digits`) when its block map ships; the README's strip
comes from `python bench/video_sweep.py`. The map is `tb.block_map()`, or probed from prompts when none ships
(`memctl.effect_video.video_probes`, about 2.5 CPU minutes). Settings: the testbed's steps and guidance, one
evaluation seed for every row; they go into the GIF's and MP4's comment and `video-sweep.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

FIDELITIES = (-1.0, 0.0, 1.0)
STRIP = (0, 2, 4, 6, 8)  # frames the PNG shows side by side; the GIF and MP4 show every frame
SCALE = 3
NAME = "video-sweep"


def _columns(tb, bmap, seed: int, fidelities) -> tuple[list, list[torch.Tensor]]:
    import memctl

    pipe = tb.pipeline()
    most = [c for c in tb.canaries if c[2] == max(c[2] for c in tb.canaries)]
    columns = [torch.stack([c[1] for c in most])]  # (K, F, C, H, W): the bound clips
    memctl.apply_knob(pipe, bmap)
    try:
        for f in fidelities:
            with memctl.fidelity(pipe, f):
                out = pipe([c[0] for c in most], generator=[torch.Generator().manual_seed(seed) for _ in most],
                           num_inference_steps=tb.spec["sampling"]["num_inference_steps"], guidance_scale=tb.guidance,
                           output_type="pt", **tb.call_kwargs)  # fmt: skip
            columns.append(out.frames.cpu().float())
    finally:
        memctl.remove_knob(pipe)
    return most, columns


def frame_strips(most, columns, fidelities, shown, names: list[str] | None = None) -> Image.Image:
    """Rows = canaries, columns = bound clip then each fidelity (or each of `names`), `shown` frames side by side."""
    gap, label_w, head = 2, 170, 16
    cell = columns[0].shape[-1] * SCALE
    block = len(shown) * cell + gap * 4
    img = Image.new("RGB", (label_w + len(columns) * block, head + len(most) * (cell + gap)), "white")
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(["bound clip (trained)"] + (names or [f"fidelity {f:+.0f}" for f in fidelities])):
        draw.text((label_w + j * block, 2), name, fill="black")
    for i, c in enumerate(most):
        y = head + i * (cell + gap)
        draw.text((4, y + cell // 2 - 6), f"{c[0]} ({c[2]}x)", fill="black")
        for j, col in enumerate(columns):
            for n, fr in enumerate(shown):
                a = (col[i, fr, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
                img.paste(Image.fromarray(a).resize((cell, cell), Image.NEAREST), (label_w + j * block + n * cell, y))
    return img


def video_testbed(model: str | Path):
    """The video testbed `model` (name or folder); a clear error for an image testbed."""
    from memctl.zoo import load_testbed

    tb = load_testbed(model)
    if not hasattr(tb, "frames"):
        raise ValueError(f"Expected a video testbed (e.g. 'moving-digits'), but {str(model)!r} holds images.")
    return tb


def render_video_sweep(
    out: str | Path, model="moving-digits", bmap=None, seed: int = 10_000, fidelities=FIDELITIES
) -> list[Path]:
    """Write `video-sweep.png`, `.gif`, `.mp4` and `.json` (settings) to `out`; returns their paths. `model`: a
    video testbed's name or folder, or the testbed itself (`video_testbed`)."""
    from memctl.video import export_gif, export_mp4

    tb = video_testbed(model) if isinstance(model, (str, Path)) else model
    if bmap is None:
        if (tb.path / "blockmap.safetensors").is_file():
            bmap = tb.block_map()
        else:
            import memctl
            from memctl.effect_video import video_probes

            bmap = memctl.probe(tb.pipeline(), video_probes(tb), method="prompt", call_kwargs=tb.call_kwargs)
    most, columns = _columns(tb, bmap, seed, fidelities)
    settings = {
        "model": tb.name, "seed": seed, "fidelities": list(fidelities), "guidance": tb.guidance,
        "steps": tb.spec["sampling"]["num_inference_steps"], "block_map": bmap.method,
        "rows": [{"prompt": c[0], "exposure": c[2]} for c in most],
    }  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = [np.asarray(frame_strips(most, columns, fidelities, [f])) for f in range(tb.frames)]
    frames = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]  # even sides for yuv420p
    comment = json.dumps(settings)
    paths = [out / f"{NAME}.{ext}" for ext in ("png", "gif", "mp4", "json")]
    frame_strips(most, columns, fidelities, STRIP).save(paths[0])
    export_gif(frames, paths[1], fps=4, comment=comment)
    export_mp4(frames, paths[2], fps=4, comment=comment)
    paths[3].write_text(json.dumps(settings, indent=1) + "\n")
    return paths
