"""Do the probing methods agree? Rank correlation of per-unit scores between ablation, condition and prompt maps.

`python bench/rank_agreement.py` → bench/results/rank_agreement.json, on both embedded models.

- ablation (the reference: zero one residual unit at a time, five noise levels) vs condition (the lever the knob
  uses: memorized tokens pulled in one unit at a time), over the units that have cross-attention;
- condition (probes with images) vs prompt (the same lever scored on the prompt-only detection signal, with the
  canary prompts `memctl.detect` flags), over the same units: can a user without training data find the same units?
Scores are averaged over noise levels; Spearman's rho and the overlap of the top-3 units are reported.
"""

import json
import time

import torch
from scipy.stats import spearmanr

import memctl
from memctl.effect import prompt_only_probes, testbed_probes
from memctl.hooks import cross_attentions

torch.set_num_threads(1)


def _top(names: list[str], scores: list[float], k: int = 3) -> set[str]:
    return {n for _, n in sorted(zip(scores, names, strict=True), reverse=True)[:k]}


out = {}
for name in ("digits-s0", "digits-s1"):
    tb = memctl.zoo.load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    maps, seconds = {}, {}
    for method in ("ablation", "condition", "prompt"):
        t0 = time.perf_counter()
        probes = prompt_only_probes(tb, pipe)[0] if method == "prompt" else testbed_probes(tb)
        maps[method] = memctl.probe(pipe, probes, method=method, progress=False)
        seconds[method] = round(time.perf_counter() - t0, 1)
    units = [b.name for b in memctl.find_blocks(pipe.unet) if cross_attentions(pipe.unet, b)]
    mean = {m: dict(zip(bm.names, bm.scores.mean(1).tolist(), strict=True)) for m, bm in maps.items()}
    rows = {}
    for a, b in (("ablation", "condition"), ("condition", "prompt"), ("ablation", "prompt")):
        sa, sb = [mean[a][u] for u in units], [mean[b][u] for u in units]
        rho = spearmanr(sa, sb).statistic
        overlap = len(_top(units, sa) & _top(units, sb))
        rows[f"{a} vs {b}"] = {"spearman": round(float(rho), 3), "top3_overlap": overlap}
    out[name] = {"units": units, "seconds": seconds, "agreement": rows,
                 "scores": {m: [round(mean[m][u], 4) for u in units] for m in maps}}  # fmt: skip
    print(name, seconds, rows, flush=True)
json.dump(
    {"command": "python bench/rank_agreement.py", "results": out},
    open("bench/results/rank_agreement.json", "w"),
    indent=1,
)
