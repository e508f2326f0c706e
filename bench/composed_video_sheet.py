"""What composed extrapolation does to the most-exposed canaries of moving-digits: whole range against high noise only.

`python bench/composed_video_sheet.py` → docs/composed-moving-digits.png (about a minute): rows = the canaries seen
16×; columns = the clip each caption is bound to, then one sample each (evaluation seed 10000, the testbed's steps
and guidance) of the plain model, composed extrapolation at −1 at every noise level, and at −1 only where the noise
level is ≥ 0.7 (`memctl.effect.COMPOSED_WINDOW`); frames 0, 2, 4, 6, 8 of each clip side by side. It prints, per
sample, the motion read from the centroid track and whether the clip is nearest its bound clip.
"""

import torch

import memctl
from memctl import metrics
from memctl.composed import composed
from memctl.effect import COMPOSED_WINDOW
from memctl.video_sweep import STRIP, frame_strips
from memctl.zoo import moving

torch.set_num_threads(1)
SEED = 10_000
tb = memctl.zoo.load_testbed("moving-digits")
pipe = tb.pipeline()
most = [c for c in tb.canaries if c[2] == max(tb.exposures)]
prompts = [c[0] for c in most]


def sample() -> torch.Tensor:
    out = pipe(prompts, generator=[torch.Generator().manual_seed(SEED) for _ in most],
               num_inference_steps=tb.spec["sampling"]["num_inference_steps"], guidance_scale=tb.guidance,
               output_type="pt", **tb.call_kwargs)  # fmt: skip
    return out.frames.cpu().float()


names = ["plain", "composed -1", f"composed -1, t >= {COMPOSED_WINDOW[0]}"]
columns = [torch.stack([c[1] for c in most])]
columns.append(sample())
with composed(pipe, -1.0, tb.prompt_parts):
    columns.append(sample())
with composed(pipe, -1.0, tb.prompt_parts, *COMPOSED_WINDOW):
    columns.append(sample())
bound = [tb.train_images.flatten(1).sub(c[1].flatten()).norm(dim=1).argmin() for c in most]
for name, clips in zip(names, columns[1:], strict=True):
    nearest, _ = metrics.nearest_and_copies(clips.flatten(1, 2), tb.train_images.flatten(1, 2), (1 / 3,))
    for i, p in enumerate(prompts):
        d, s = tb.read_motion(clips[i : i + 1])[0].tolist()
        print(f"{name:24} {p:32} reads {moving.DIRECTIONS[d]}, {moving.SPEEDS[s]}; nearest bound: "
              f"{int(nearest[i]) == int(bound[i])}")  # fmt: skip
sheet = frame_strips(most, columns, None, STRIP, names)
sheet.save("docs/composed-moving-digits.png")
print("docs/composed-moving-digits.png", sheet.size)
