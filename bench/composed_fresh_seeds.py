"""The calibrated-window row of composed extrapolation again, at seeds no run has read (20,000 on).

    python bench/composed_fresh_seeds.py [MODEL ...]   # -> bench/results/composed_fresh_seeds.json, ~7 min a model

The effect bench measured "composed calibrated window" at its evaluation seeds (10,000 on, 4 per prompt) after the
rule was fixed; its pass on digits-attr-s1 rests on 32 most-exposed samples and on ordinary validity 2 points under
plain. Here the plain model and the row are sampled at 4 fresh seeds per prompt (the window is calibrated as in the
bench: the probe pairs at seeds 0-7), with the bench's scoring and checks.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from memctl.effect import (
    CALIBRATION_SEEDS,
    _headline,
    _measure,
    _parts,
    calibrated_composed_setup,
    testbed_probes,
)
from memctl.evaluate import EvalSpec

OUT = Path(__file__).parent / "results" / "composed_fresh_seeds.json"
SEED_BASE = 20_000


def run(name: str) -> dict:
    from contextlib import nullcontext

    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = EvalSpec(seeds=4, seed_base=SEED_BASE, guidance=tb.guidance)
    probes = testbed_probes(tb)
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    reference = torch.cat([probes.images("memorized"), probes.images("general")])
    setup = calibrated_composed_setup(pipe, _parts(tb), probes.memorized, reference, seeds=CALIBRATION_SEEDS,
                                      steps=spec.steps, guidance=spec.guidance)  # fmt: skip
    row, _ = _measure(tb, pipe, spec, ref, setup)
    p, c = _headline(tb, plain), _headline(tb, row)
    checks = {
        "most-exposed copy_1/3 at -1 <= 0.05": c["most_copy"] <= 0.05,
        "ordinary valid at -1 >= 0.95 x plain": c["ordinary_valid"] >= 0.95 * p["ordinary_valid"],
        "canary novel-valid at -1 >= plain": c["novel_valid"] >= p["novel_valid"],
    }
    out = {"eval": spec.to_dict(), "plain": p, "composed calibrated window": c, "calibration": row["calibration"],
           "evals_per_image": row["cost"]["denoiser_evals_per_image"], "checks": checks}  # fmt: skip
    print(name, json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    models = sys.argv[1:] or ["digits-attr-s1", "digits-attr-s0"]
    result = {"command": "python " + shlex.join(sys.argv), "models": {m: run(m) for m in models}}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
