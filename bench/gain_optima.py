"""Per-probe optima of the fidelity (+) gain, by exposure: why one γ cannot serve weak and strong memorization.

    python bench/gain_optima.py digits-s0 digits-s1 digits-s2 digits-attr-s0 digits-attr-s1

`memctl.calibrate.fidelity_gain` takes one quantile of the memorized probes' denoising-optimal steps
`γ* = −⟨ε − n, ε − ε_pulled⟩ / ‖ε − ε_pulled‖²`. This bench reads the same quantities on the same probe batches
(the condition map's probe set, probe seeds; no evaluation seed) and reports, per noise level and canary exposure,
the median γ*, the median contrast norm ‖ε − ε_pulled‖ and the median optimal step length γ*·‖ε − ε_pulled‖, and the
general probes' median contrast norm, each pulled toward a bank without its own conditioning as the calibration's cap
reads them (`memctl.calibrate.held_out_general`). Output: `bench/results/gain_optima.json`.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import torch

import memctl.calibrate as calibrate
from memctl.atomic import atomic_write
from memctl.effect import testbed_probes

OUT = Path(__file__).parent / "results" / "gain_optima.json"
probe_module = importlib.import_module("memctl.probe")  # (`memctl.probe` the name is the function)


def optima(name: str) -> dict:
    """The per-level, per-exposure medians for one testbed, and the γ the calibration chose."""
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    exposures = torch.tensor([c[2] for c in tb.canaries])
    levels, general = [], {}  # general: per level, the held-out general probes' contrast norms

    def recording(*args, **kwargs):
        # the calibration's own contrasts (memctl.calibrate.contrasts), read per probe as they pass to fidelity_gain
        for j, (a, d, m) in enumerate(real(*args, **kwargs)):
            if m == 0:  # a held-out general probes' pass (memctl.calibrate.held_out_general), level j
                general.setdefault(j, []).append(d.norm(dim=1))
                yield a, d, m
                continue
            norm = d[:m].norm(dim=1)
            best = -(a[:m] * d[:m]).sum(1) / norm.pow(2).clamp_min(1e-12)
            rows = exposures.repeat(m // len(exposures))  # memorized rows: the canaries, once per repeat
            level = {}
            for e in sorted(set(exposures.tolist())):
                k = rows == e
                level[f"{e}x"] = {
                    "optimum": round(float(best[k].median()), 4),
                    "contrast_norm": round(float(norm[k].median()), 4),
                    "step_length": round(float((best[k] * norm[k]).median()), 4),
                }
            levels.append({"noise_level": probe_module.NOISE_LEVELS[j], **level})
            yield a, d, m

    real = calibrate.contrasts
    calibrate.contrasts = recording
    try:
        _, _, extra, _ = probe_module.attribute_condition(pipe, testbed_probes(tb), progress=False)
    finally:
        calibrate.contrasts = real
    for j, level in enumerate(levels):
        level["general_contrast_norm"] = round(float(torch.cat(general[j]).median()), 4)
    return {"levels": levels, "calibration": extra.get("fidelity_calibration")}


def main(models: list[str]) -> None:
    torch.set_num_threads(1)
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"models": {}}
    for name in models:
        t = time.perf_counter()
        record = optima(name)
        record["command"] = f"python bench/gain_optima.py {name}"
        record["seconds"] = round(time.perf_counter() - t, 1)
        results["models"][name] = record
        print(name, json.dumps(record["calibration"]), flush=True)
        for level in record["levels"]:
            print(" ", json.dumps(level), flush=True)
    atomic_write(OUT, (json.dumps(results, indent=1) + "\n").encode())


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(f"usage: python bench/gain_optima.py MODEL [MODEL ...] (e.g. digits-s0), but got {sys.argv[1:]}")
    main(sys.argv[1:])
