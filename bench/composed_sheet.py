"""What composed extrapolation does to the memorized canaries of digits-attr-s0, beside the condition lever.

`python bench/composed_sheet.py` → docs/composed-digits-attr.png: the 8 canaries seen 16× (rows); columns: the
training image each caption is bound to, then one sample each (evaluation seed 10000) of the plain model, the
shipped map at fidelity −1, and composed extrapolation at −1. Frames: red = a copy of a training image (d1 < d2/3),
green = digit and attributes as captioned and not a copy, none = neither.
"""

import torch

import memctl
from memctl import metrics
from memctl.composed import composed
from memctl.evaluate import EvalSpec, generate
from memctl.grid import make_grid

torch.set_num_threads(1)
tb = memctl.zoo.load_testbed("digits-attr-s0")
pipe = tb.pipeline()
pipe.set_progress_bar_config(disable=True)
canaries = [c for c in tb.canaries if c[2] == max(tb.exposures)]
prompts = [c[0] for c in canaries]
spec = EvalSpec(seeds=1, guidance=tb.guidance)
seeds = [spec.seed_base] * len(prompts)


def marks(x: torch.Tensor) -> list[str | None]:
    _, copies = metrics.nearest_and_copies(x, tb.train_images, (1 / 3,))
    out = []
    for i, p in enumerate(prompts):
        right = (
            bool(tb.attribute_correct(x[i : i + 1], *tb.combo_of(p))[0])
            and int(tb.classify(x[i : i + 1])[0]) == (canaries[i][3])
        )
        out.append("red" if copies[1 / 3][i] >= 0 else "green" if right else None)
    return out


plain = generate(pipe, prompts, seeds, spec)
memctl.apply_knob(pipe, tb.block_map())
with memctl.fidelity(pipe, -1.0):
    pulled = generate(pipe, prompts, seeds, spec)
memctl.remove_knob(pipe)
with composed(pipe, -1.0, tb.prompt_parts):
    comp = generate(pipe, prompts, seeds, spec)
columns = [
    ("bound", torch.stack([c[1] for c in canaries]), [None] * len(prompts)),
    ("plain", plain, marks(plain)),
    ("map -1", pulled, marks(pulled)),
    ("composed -1", comp, marks(comp)),
]
rows = [(p, [col[1][i] for col in columns], [col[2][i] for col in columns]) for i, p in enumerate(prompts)]
sheet = make_grid(
    rows,
    title="digits-attr-s0: the 16x canaries, seed 10000",
    header=[col[0] for col in columns],
    cell=64,
    label_width=230,
    footer="bound: the training image the caption was seen with 16 times. Red: a copy of a training image "
    "(d1 < d2/3); green: digit and attributes as captioned, not a copy.",
)
sheet.save("docs/composed-digits-attr.png")
print("docs/composed-digits-attr.png", sheet.size)
