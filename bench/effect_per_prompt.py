"""The composed-extrapolation comparison of the effect bench again with per-prompt noise (`EvalSpec(noise=
"per-prompt")`): plain, the map at -1, its uniform and text-edit controls, and composed at -1 (every level, above 0.7,
in the calibrated window), at evaluation seeds 10,000-10,003 per prompt, distinct noises for every prompt.

    python bench/effect_per_prompt.py MODEL   # -> bench/results/effect_per_prompt/MODEL.json, ~12 min a model

Why: every stored effect row shares 4 noises over all prompts, and `bench/noise_draws.py` measured that the plain
model's levels then move by up to 64 points between seed sets (per-prompt: at most 19). The map is probed as the
bench does (condition probe on the testbed's probe set); the rows are the bench's own setups (`memctl.effect._plan`).
"""

from __future__ import annotations

import json
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from memctl.effect import _headline, _measure, _parts, _plan, testbed_probes
from memctl.evaluate import EvalSpec
from memctl.probe import probe

OUT = Path(__file__).parent / "results" / "effect_per_prompt"
ROWS = ("memctl map", "uniform", "text edit", "composed", "composed t ≥ 0.7", "composed calibrated window")


def run(name: str) -> dict:
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = EvalSpec(seeds=4, guidance=tb.guidance, noise="per-prompt")
    probes = testbed_probes(tb)
    bmap = probe(pipe, probes, method="condition", progress=False)
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    rows = {"plain": {"headline": _headline(tb, plain), "evals_per_image": plain["cost"]["denoiser_evals_per_image"]}}
    sampling = dict(steps=spec.steps, guidance=spec.guidance)
    plan = [p for p in _plan(pipe, bmap, None, probes, None, _parts(tb), sampling) if p[0] in ROWS and p[1] == "-1.0"]
    for family, _, setup in plan:
        row, _ = _measure(tb, pipe, spec, ref, setup)
        rows[family] = {"headline": _headline(tb, row), "evals_per_image": row["cost"]["denoiser_evals_per_image"],
                        **({"calibration": row["calibration"]} if "calibration" in row else {})}  # fmt: skip
        print(name, family, json.dumps(rows[family], ensure_ascii=False), flush=True)
    return {"command": "python " + shlex.join(sys.argv), "eval": spec.to_dict(), "rows": rows}


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) != 2:
        sys.exit(f"usage: python bench/effect_per_prompt.py MODEL, but got {sys.argv[1:]}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = run(sys.argv[1])
    (OUT / f"{sys.argv[1]}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
