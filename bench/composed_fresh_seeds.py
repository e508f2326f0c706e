"""The calibrated-window row of composed extrapolation again, at seeds no run has read (20,000 on).

    python bench/composed_fresh_seeds.py [MODEL ...]   # -> bench/results/composed_fresh_seeds.json, ~7 min a model
    python bench/composed_fresh_seeds.py --noise per-prompt [MODEL ...]   # -> ..._per_prompt.json, ~9 min a model

The effect bench measured "composed calibrated window" at its evaluation seeds (10,000 on, 4 per prompt) after the
rule was fixed; its pass on digits-attr-s1 rests on 32 most-exposed samples and on ordinary validity 2 points under
plain. Here the plain model and the row are sampled at 4 fresh seeds per prompt (the window is calibrated as in the
bench: the probe pairs at seeds 0-7), with the bench's scoring and checks. A video testbed (moving-digits) gets the
row "composed t ≥ 0.7" instead, at 2 fresh seeds and the bench's 10 steps, with the most-exposed clips' nearest-bound
share and the canaries' motion validity. With `--noise per-prompt` every prompt gets its own fresh noises (as the
effect bench does since stop 32; from seed 40,000), and the image models also get composed extrapolation at −0.5
(every level), the row that passed both extrapolation bars on digits-attr-s1 at the evaluation seeds.
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
from memctl.effect_video import VIDEO_STEPS, clip_readout, is_video, video_composed_plan
from memctl.evaluate import EvalSpec

OUT = Path(__file__).parent / "results" / "composed_fresh_seeds.json"
SEED_BASE = 20_000
# per-prompt noise starts further on: prompt i's seeds 40,000 + 4 i + s, none of them read by any run (the shared
# runs read 20,000-20,003 for every prompt, bench/noise_draws.py 30,000 on)
PER_PROMPT_SEED_BASE = 40_000


def run(name: str, noise: str = "shared") -> dict:
    from contextlib import nullcontext

    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = PER_PROMPT_SEED_BASE if noise == "per-prompt" else SEED_BASE
    if is_video(name):
        return run_video(tb, pipe, noise, base)
    spec = EvalSpec(seeds=4, seed_base=base, guidance=tb.guidance, noise=noise)
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
    if noise == "per-prompt":  # composed at -0.5, every level
        half, _ = _measure(tb, pipe, spec, ref, next(s for f, v, s in plan if (f, v) == ("composed", "-0.5")))
        h = _headline(tb, half)
        out["composed -0.5"] = {**h, "evals_per_image": half["cost"]["denoiser_evals_per_image"],
                                "checks": extrapolation_checks(p, h)}  # fmt: skip
    print(name, json.dumps(out), flush=True)
    return out


def run_video(tb, pipe, noise: str, base: int) -> dict:
    from contextlib import nullcontext

    spec = EvalSpec(seeds=2, seed_base=base, guidance=tb.guidance, steps=VIDEO_STEPS, noise=noise)
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    setup = next(s for family, _, s in video_composed_plan(tb, pipe) if family == COMPOSED_WINDOW_FAMILY)
    row, _ = _measure(tb, pipe, spec, ref, setup)

    def read(r: dict) -> dict:
        clip = clip_readout(r)
        return {**_headline(tb, r), "most_nearest_bound": clip["nearest_bound"],
                "canary_motion_valid": clip["canary_motion_valid"]}  # fmt: skip

    out = {"eval": spec.to_dict(), "plain": read(plain), "composed t ≥ 0.7": read(row),
           "evals_per_image": row["cost"]["denoiser_evals_per_image"]}  # fmt: skip
    print(tb.spec.get("name"), json.dumps(out, ensure_ascii=False), flush=True)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    noise = "shared"
    if args[:1] == ["--noise"]:
        if len(args) < 2 or args[1] not in ("shared", "per-prompt"):
            sys.exit(f"Expected --noise shared or per-prompt, but got {args[1:2]}.")
        noise, args = args[1], args[2:]
        OUT = OUT.with_name(f"composed_fresh_seeds_{noise.replace('-', '_')}.json") if noise != "shared" else OUT
    models = args or ["digits-attr-s1", "digits-attr-s0"]
    earlier = json.loads(OUT.read_text())["models"] if OUT.is_file() else {}
    result = {"command": "python " + shlex.join(sys.argv), "models": {m: run(m, noise) for m in models}}
    commands = {m: result["command"] for m in models}
    if earlier:  # other models' results stay, each with the command that made it
        old = json.loads(OUT.read_text())
        commands = {**{m: old.get("commands", {}).get(m, old["command"]) for m in earlier}, **commands}
        result["models"] = {**earlier, **result["models"]}
    result["commands"] = commands
    OUT.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
