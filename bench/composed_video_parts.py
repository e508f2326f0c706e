"""Why composed extrapolation breaks motion on moving-digits: each attribute read from the parts and the composition.

`python bench/composed_video_parts.py` → bench/results/composed_video_parts.json. Calibration seeds 0-3 (never the
evaluation seeds), the video bench's 10 steps, the testbed's guidance. For the 12 canary captions ("a two moving
right, slowly"): the share of clips whose digit, direction and speed read as captioned, sampled by the plain model
from the full caption, from each part ("a two moving right": direction only; "a two moving slowly": speed only;
"a two"), and from the composition at fidelity -1 (`memctl.composed`).
"""

import json
import time

import torch

import memctl
from memctl.composed import composed
from memctl.effect_video import VIDEO_STEPS
from memctl.evaluate import EvalSpec, generate

torch.set_num_threads(1)
tb = memctl.zoo.load_testbed("moving-digits")
pipe = tb.pipeline()
pipe.set_progress_bar_config(disable=True)
spec = EvalSpec(seeds=4, seed_base=0, guidance=tb.guidance, steps=VIDEO_STEPS)
seeds = list(range(spec.seed_base, spec.seed_base + spec.seeds))
captions = [c[0] for c in tb.canaries]
t0 = time.perf_counter()


def read(prompts: list[str], targets: list[str]) -> dict:
    """Shares of clips (prompt i sampled at every seed) whose digit / direction / speed read as target i names."""
    clips = generate(pipe, [p for p in prompts for _ in seeds], seeds * len(prompts), spec, **tb.call_kwargs)
    want = torch.tensor([[c, *combo] for c, combo in (tb.combo_of(t) for t in targets for _ in seeds)])
    got = tb.classify_attributes(clips)
    hit = (got == want).float().mean(0)
    return {"digit": round(float(hit[0]), 3), "direction": round(float(hit[1]), 3), "speed": round(float(hit[2]), 3)}


rows = {"full caption": read(captions, captions)}
parts = [tb.prompt_parts(c) for c in captions]
rows["part without speed (direction only)"] = read([p.without[1] for p in parts], captions)
rows["part without direction (speed only)"] = read([p.without[0] for p in parts], captions)
rows["digit alone"] = read([p.common for p in parts], captions)
with composed(pipe, -1.0, tb.prompt_parts):
    rows["composed -1"] = read(captions, captions)
with composed(pipe, -0.5, tb.prompt_parts):
    rows["composed -0.5"] = read(captions, captions)
for k, v in rows.items():
    print(f"{k:40s} {v}", flush=True)
out = {"command": "python bench/composed_video_parts.py", "spec": spec.to_dict(),
       "seconds": round(time.perf_counter() - t0, 1), "rows": rows}  # fmt: skip
with open("bench/results/composed_video_parts.json", "w") as fh:
    json.dump(out, fh, indent=1)
