"""How much the plain model's effect-bench numbers depend on which seeds are drawn, with shared and per-prompt noise.

    python bench/noise_draws.py [MODEL ...]   # -> bench/results/noise_draws.json, ~5 min a model

`memctl.evaluate.sample_testbed` gave every prompt the same seeds (`EvalSpec(noise="shared")`, what every record in
bench/results/effect was measured with), so a row's level rests on `seeds` noise draws. Here the plain model is
scored at 4 seeds per prompt from three seed bases (10,000, 20,000, 30,000), with shared and with per-prompt noise
(`noise="per-prompt"`: prompt i's seeds are `base + 4 i + s`), and the spread of each headline measure over the bases
is reported.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from memctl.effect import _headline
from memctl.evaluate import EvalSpec, sample_testbed, score_samples

OUT = Path(__file__).parent / "results" / "noise_draws.json"
BASES = (10_000, 20_000, 30_000)


def run(name: str) -> dict:
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for noise in ("shared", "per-prompt"):
        rows = {}
        for base in BASES:
            spec = EvalSpec(seeds=4, seed_base=base, guidance=tb.guidance, noise=noise)
            s = sample_testbed(pipe, tb, spec)
            rows[str(base)] = {k: round(v, 4) for k, v in _headline(tb, score_samples(tb, s, s)).items()}
        spread = {k: round(max(r[k] for r in rows.values()) - min(r[k] for r in rows.values()), 4)
                  for k in next(iter(rows.values()))}  # fmt: skip
        out[noise] = {"by_seed_base": rows, "spread": spread}
        print(name, noise, json.dumps(out[noise]), flush=True)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    models = sys.argv[1:] or ["digits-attr-s1", "digits-attr-s0"]
    result = {"command": "python " + shlex.join(sys.argv), "models": {m: run(m) for m in models}}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
