"""Does a finer granularity make the condition map's selection matter? Cross-attention heads against units.

`python bench/localization.py MODEL [MODEL ...]` → bench/results/localization-<MODEL>.json. For each model: the
condition lever scored per head (`memctl.heads`) on the same probe set and probe seed as the unit map of
`memctl bench effect`, then sampled at fidelity −1 and −0.5 with the effect bench's evaluation seeds. The unit map,
uniform and text-edit rows come from `bench/results/effect/<MODEL>.json` (same seeds, same probe), and each family
is compared at the unit map's most-exposed copy rate at −1. Also: how much the head scores vary inside a unit
against between units (if heads of one unit score alike, a head map can only repeat the unit map).
"""

import json
import sys
import time
from pathlib import Path

import torch

import memctl
from memctl.effect import _at_copy, _headline, _measure, testbed_probes
from memctl.evaluate import EvalSpec, sample_testbed
from memctl.heads import HeadKnob, cross_attention_heads, head_scores
from memctl.probe import NOISE_LEVELS

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"

for name in sys.argv[1:] or ["digits-s0"]:
    effect = json.loads((RESULTS / "effect" / f"{name}.json").read_text())
    tb = memctl.zoo.load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = EvalSpec(**effect["eval"])
    probes = testbed_probes(tb)
    t0 = time.perf_counter()
    bmap = memctl.probe(pipe, probes, method="condition", progress=False)
    scores = head_scores(pipe, probes, bmap.lever_tensors, NOISE_LEVELS)
    seconds = round(time.perf_counter() - t0, 1)
    heads = cross_attention_heads(pipe.unet)
    per_unit = scores.mean(1).reshape(-1, heads[0][2])  # (units, heads)
    ref = sample_testbed(pipe, tb, spec)
    rows = {}
    for f in (-1.0, -0.5):
        knob = HeadKnob(pipe, bmap.lever_tensors, scores, NOISE_LEVELS, f, bmap.meta["pull_max"])
        rows[f"{f:+.1f}"], _ = _measure(tb, pipe, spec, ref, knob.applied)
    head = {s: _headline(tb, r) for s, r in rows.items()}
    eff = effect["bars"]["headline"]
    plain, x = eff["plain"]["0"], eff["memctl map"]["-1.0"]["most_copy"]
    keys = [k for k in ("novel_valid", "compositional") if k in plain]
    compare = {
        fam: {k: round(_at_copy(plain, list(by.values()), x, k), 4) for k in keys}
        for fam, by in {"head map": head, "unit map": {"-1.0": eff["memctl map"]["-1.0"],
                        "-0.5": eff["memctl map"]["-0.5"]}, "uniform": eff["uniform"],
                        "text edit": eff["text edit"]}.items()
    }  # fmt: skip
    out = {
        "model": name,
        "command": f"python bench/localization.py {name}",
        "probe_seconds_units_and_heads": seconds,
        "head_scores_mean_over_levels": per_unit.tolist(),
        "within_unit_std_over_between_unit_std": round(
            float(per_unit.std(1).mean() / per_unit.mean(1).std().clamp_min(1e-12)), 3
        ),
        "rows": rows,
        "headline": head,
        "at_unit_map_copy_rate": {"most_exposed_copy": x, **compare},
    }
    (RESULTS / f"localization-{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("model", "within_unit_std_over_between_unit_std", "headline",
                                          "at_unit_map_copy_rate")}, indent=1))  # fmt: skip
