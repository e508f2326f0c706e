"""How far should fidelity -1 pull memorized tokens? The exploration behind `pull_max` = 2, on both models.

`python bench/pull_overshoot.py` → bench/results/pull_overshoot.json (8 evaluation seeds, guidance 1.0). The
shipped condition map at fidelity -1 with `pull_max` 1 (tokens pulled at most onto the nearest general
conditioning, the previous release) or 2 (past it, up to twice the way), at knob strengths 1, 1.5 and 2. These are
evaluation seeds of the same models the bench reports: the constant was chosen on them (see the note in README).
"""

import json
import time

import torch

import memctl
from memctl.evaluate import EvalSpec, sample_testbed, score_samples

torch.set_num_threads(1)
out = {}
t0 = time.perf_counter()
for name in ("digits-s0", "digits-s1"):
    tb = memctl.zoo.load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = EvalSpec(seeds=8)
    ref = sample_testbed(pipe, tb, spec)
    rows = {}
    for pull_max, strength in ((1.0, 1.0), (2.0, 1.0), (2.0, 1.5), (2.0, 2.0)):
        bmap = tb.block_map()
        bmap.meta["pull_max"] = pull_max
        memctl.apply_knob(pipe, bmap, strength=strength)
        with memctl.fidelity(pipe, -1.0):
            r = score_samples(tb, sample_testbed(pipe, tb, spec), ref)
        memctl.remove_knob(pipe)
        c = r["canary"]
        rows[f"pull_max {pull_max:g}, strength {strength:g}"] = {
            "copy_1/3": {e: c[e]["copy_1/3"] for e in ("1", "4", "16")},
            "copy_bound_1/3": {e: c[e]["copy_bound_1/3"] for e in ("1", "4", "16")},
            "novel_valid": c["all"]["novel_valid"],
            "ordinary_valid": r["ordinary"]["valid"],
            "collateral": r["ordinary"]["collateral"],
        }
        print(name, pull_max, strength, rows[f"pull_max {pull_max:g}, strength {strength:g}"], flush=True)
    out[name] = rows
json.dump({"command": "python bench/pull_overshoot.py", "seeds": 8, "seconds": round(time.perf_counter() - t0, 1),
           "results": out}, open("bench/results/pull_overshoot.json", "w"), indent=1)  # fmt: skip
