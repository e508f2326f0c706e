"""The moving-digits fidelity sweep as a frame strip and a GIF: `python bench/video_sweep.py`.

Probes the testbed's condition map from prompts (`memctl.effect_video.video_probes`, the map `memctl bench effect`
measures; about 2.5 min; not shipped: its bank of general conditionings, 61 prompts × 512 tokens, weighs 13 MB),
or loads `assets/moving-digits-s0/blockmap.safetensors` when there is one, then samples
the four most-exposed canaries at fidelity -1, 0, +1 (evaluation seed 10,000, the testbed's steps and guidance) and
writes `docs/moving-digits-sweep.png` (one row per canary: its bound training clip, then each fidelity; frames 0, 2,
4, 6, 8 left to right) and `docs/moving-digits-sweep.gif` (the same grid, animated).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import memctl
from memctl.effect_video import video_probes
from memctl.video import export_gif

torch.set_num_threads(1)
FIDELITIES = (-1.0, 0.0, 1.0)
SCALE = 3
STRIP = (0, 2, 4, 6, 8)  # frames the PNG shows; the GIF shows every frame
tb = memctl.zoo.load_testbed("moving-digits")
pipe = tb.pipeline()
path = tb.path / "blockmap.safetensors"
if path.is_file():
    bmap = memctl.BlockMap.load(path)
else:
    bmap = memctl.probe(pipe, video_probes(tb), method="prompt", call_kwargs=tb.call_kwargs, progress=False)
most = [c for c in tb.canaries if c[2] == max(tb.exposures)]
memctl.apply_knob(pipe, bmap)
columns = [torch.stack([c[1] for c in most])]  # (K, F, C, H, W): the bound clips
for f in FIDELITIES:
    with memctl.fidelity(pipe, f):
        out = pipe([c[0] for c in most], generator=[torch.Generator().manual_seed(10_000) for _ in most],
                   num_inference_steps=tb.spec["sampling"]["num_inference_steps"], guidance_scale=tb.guidance,
                   output_type="pt", **tb.call_kwargs)  # fmt: skip
    columns.append(out.frames.cpu())
memctl.remove_knob(pipe)
k, frames = len(most), tb.frames
gap, label_w, head = 2, 160, 16
cell = 16 * SCALE


def grid(frame: int | None) -> Image.Image:
    """Rows = canaries, columns = bound / fidelities; a frame index, or None for the `STRIP` frames side by side."""
    shown = STRIP if frame is None else [frame]
    width = label_w + len(columns) * (len(shown) * cell + gap * 4)
    img = Image.new("RGB", (width, head + k * (cell + gap)), "white")
    draw = ImageDraw.Draw(img)
    names = ["bound clip (trained)"] + [f"fidelity {f:+.0f}" for f in FIDELITIES]
    for j, name in enumerate(names):
        draw.text((label_w + j * (len(shown) * cell + gap * 4), 2), name, fill="black")
    for i, c in enumerate(most):
        y = head + i * (cell + gap)
        draw.text((4, y + cell // 2 - 6), c[0], fill="black")
        for j, col in enumerate(columns):
            for n, fr in enumerate(shown):
                x = label_w + j * (len(shown) * cell + gap * 4) + n * cell
                a = (col[i, fr, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
                img.paste(Image.fromarray(a).resize((cell, cell), Image.NEAREST), (x, y))
    return img


out = Path("docs")
grid(None).save(out / "moving-digits-sweep.png")
export_gif([np.asarray(grid(f)) for f in range(frames)], out / "moving-digits-sweep.gif", fps=4)
print("wrote", out / "moving-digits-sweep.png", out / "moving-digits-sweep.gif")
