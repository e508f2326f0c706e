"""The calibrated-window row of composed extrapolation again, at seeds no run has read (20,000 on).

    python bench/composed_fresh_seeds.py [MODEL ...]   # -> bench/results/composed_fresh_seeds.json, ~7 min a model

The effect bench measured "composed calibrated window" at its evaluation seeds (10,000 on, 4 per prompt) after the
rule was fixed; its pass on digits-attr-s1 rests on 32 most-exposed samples and on ordinary validity 2 points under
plain. Here the plain model and the row are sampled at 4 fresh seeds per prompt (the window is calibrated as in the
bench: the probe pairs at seeds 0-7), with the bench's scoring and checks. A video testbed (moving-digits) gets the
row "composed t ≥ 0.7" instead, at 2 fresh seeds and the bench's 10 steps, with the most-exposed clips' nearest-bound
share and the canaries' motion validity.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from memctl.effect import (
    CALIBRATION_SEEDS,
    COMPOSED_CALIBRATED_FAMILY,
    COMPOSED_WINDOW_FAMILY,
    _headline,
    _measure,
    _parts,
    composed_plan,
    extrapolation_checks,
    probe_reference,
    testbed_probes,
)
from memctl.effect_video import VIDEO_STEPS, is_video, video_composed_plan
from memctl.evaluate import EvalSpec

OUT = Path(__file__).parent / "results" / "composed_fresh_seeds.json"
SEED_BASE = 20_000


def run(name: str) -> dict:
    from contextlib import nullcontext

    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    if is_video(name):
        return run_video(tb, pipe)
    spec = EvalSpec(seeds=4, seed_base=SEED_BASE, guidance=tb.guidance)
    probes = testbed_probes(tb)
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    plan = composed_plan(pipe, _parts(tb), probes.memorized, probe_reference(probes), seeds=CALIBRATION_SEEDS,
                         steps=spec.steps, guidance=spec.guidance)  # fmt: skip
    setup = next(s for family, _, s in plan if family == COMPOSED_CALIBRATED_FAMILY)
    row, _ = _measure(tb, pipe, spec, ref, setup)
    p, c = _headline(tb, plain), _headline(tb, row)
    checks = extrapolation_checks(p, c)
    out = {"eval": spec.to_dict(), "plain": p, "composed calibrated window": c, "calibration": row["calibration"],
           "evals_per_image": row["cost"]["denoiser_evals_per_image"], "checks": checks}  # fmt: skip
    print(name, json.dumps(out), flush=True)
    return out


def run_video(tb, pipe) -> dict:
    from contextlib import nullcontext

    spec = EvalSpec(seeds=2, seed_base=SEED_BASE, guidance=tb.guidance, steps=VIDEO_STEPS)
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    setup = next(s for family, _, s in video_composed_plan(tb, pipe) if family == COMPOSED_WINDOW_FAMILY)
    row, _ = _measure(tb, pipe, spec, ref, setup)

    def read(r: dict) -> dict:
        most = str(max(tb.exposures))
        return {**_headline(tb, r), "most_nearest_bound": r["canary"][most]["nearest_bound"],
                "canary_motion_valid": r["canary"]["all"]["motion_valid"]}  # fmt: skip

    out = {"eval": spec.to_dict(), "plain": read(plain), "composed t ≥ 0.7": read(row),
           "evals_per_image": row["cost"]["denoiser_evals_per_image"]}  # fmt: skip
    print(tb.spec.get("name"), json.dumps(out, ensure_ascii=False), flush=True)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    models = sys.argv[1:] or ["digits-attr-s1", "digits-attr-s0"]
    earlier = json.loads(OUT.read_text())["models"] if OUT.is_file() else {}
    result = {"command": "python " + shlex.join(sys.argv), "models": {m: run(m) for m in models}}
    commands = {m: result["command"] for m in models}
    if earlier:  # other models' results stay, each with the command that made it
        old = json.loads(OUT.read_text())
        commands = {**{m: old.get("commands", {}).get(m, old["command"]) for m in earlier}, **commands}
        result["models"] = {**earlier, **result["models"]}
    result["commands"] = commands
    OUT.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
