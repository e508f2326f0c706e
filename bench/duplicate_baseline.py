"""What do the most-exposed canaries copy at fidelity -1? Compare with their class's ordinary prompt.

`python bench/duplicate_baseline.py` → bench/results/duplicate_baseline.json. At fidelity -1 the most-exposed
canaries copy no bound image (0 %) but some *duplicated* training image of their digit (6 % on both models, from
`bench/results/effect.json`). This measures how often the plain ordinary prompt of the same digits ("a two") copies
at the same evaluation seeds: the rate the knob brings a canary back to.
"""

import json

import torch

import memctl
from memctl.evaluate import EvalSpec, generate

torch.set_num_threads(1)
out = {}
for name in ("digits-s0", "digits-s1"):
    tb = memctl.zoo.load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = EvalSpec(seeds=8)
    seeds = [spec.seed_base + s for s in range(spec.seeds)]
    most = [c for c in tb.canaries if c[2] == max(tb.exposures)]
    x = generate(pipe, [tb.prompt(c[3]) for c in most for _ in seeds], seeds * len(most), spec)
    two = torch.cdist(x.flatten(1), tb.train_images.flatten(1)).topk(2, largest=False).values
    rate = float((two[:, 0] / two[:, 1] < 1 / 3).float().mean())
    out[name] = {"classes": [tb.classes[c[3]] for c in most], "ordinary_copy_1/3": round(rate, 4)}
    print(name, out[name], flush=True)
json.dump(
    {"command": "python bench/duplicate_baseline.py", "seeds": 8, "results": out},
    open("bench/results/duplicate_baseline.json", "w"),
    indent=1,
)
