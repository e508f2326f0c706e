"""Collateral of the shipped map on ordinary prompts that are NOT in its general probe bank (other phrasings).

`python bench/collateral_unseen.py` → bench/results/collateral_unseen.json. The effect bench's ordinary prompts
("a seven") are the general probes' prompts; this checks prompts the map never saw ("the digit seven",
"a handwritten seven") at the same evaluation seeds.
"""

import json

import torch

import memctl
from memctl import metrics
from memctl.evaluate import EvalSpec, generate

torch.set_num_threads(1)
out = {}
for name in ("digits-s0", "digits-s1"):
    tb = memctl.zoo.load_testbed(name)
    pipe = tb.pipeline()
    spec = EvalSpec(seeds=8)
    seeds = [spec.seed_base + s for s in range(spec.seeds)]
    prompts = [tb.prompt(c, phrasing) for phrasing in (1, 2) for c in range(10) for _ in seeds]
    classes = torch.tensor([c for _ in (1, 2) for c in range(10) for _ in seeds])
    ref = generate(pipe, prompts, seeds * 20, spec)
    memctl.apply_knob(pipe, tb.block_map())
    rows = {}
    for f in (-1.0, -0.5, 0.5, 1.0):
        with memctl.fidelity(pipe, f):
            x = generate(pipe, prompts, seeds * 20, spec)
        norm = metrics.same_class_mean_distance(tb.train_images, tb.train_classes, 10)[classes]
        rows[str(f)] = {
            "collateral": round(metrics.collateral(x, ref, norm), 4),
            "valid": metrics.validity(tb.classify(x), classes),
        }
    rows["0.0"] = {"valid": metrics.validity(tb.classify(ref), classes)}
    out[name] = rows
    print(name, rows, flush=True)
json.dump(
    {"command": "python bench/collateral_unseen.py", "seeds": 8, "results": out},
    open("bench/results/collateral_unseen.json", "w"),
    indent=1,
)
