"""Is the map's learned subspace worse than a random one on video? The effect record of moving-digits has one
random-subspace control seed, and at −1 it beat the map and every lever (no most-exposed clip nearest its bound clip,
canary novel-valid 54 % against plain's 42 %, motion 100 %). This samples the map, uniform and `SEEDS` random-subspace
controls (`BlockMap.shuffled(s)`, the bench's own control) at −1 with the effect bench's settings (2 evaluation seeds
per prompt, noise per prompt, 10 steps), plus the placement-shuffled ones, so the one seed is read beside others.

    python bench/video_random_controls.py [SEEDS]   # -> bench/results/video_random_controls.json, ~2 min a row
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from memctl.blocks import pipeline_denoisers
from memctl.controls import control_maps
from memctl.effect import _headline, _measure, knob_setup
from memctl.effect_video import VIDEO_STEPS, clip_readout, video_probes
from memctl.evaluate import EvalSpec
from memctl.probe import probe

OUT = Path(__file__).parent / "results" / "video_random_controls.json"


def _row(tb, row: dict) -> dict:
    return {**_headline(tb, row), **clip_readout(row)}


def run(seeds: int) -> dict:
    from memctl.zoo import load_testbed

    tb = load_testbed("moving-digits")
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = EvalSpec(seeds=2, guidance=tb.guidance, steps=VIDEO_STEPS, noise="per-prompt")
    bmap = probe(pipe, video_probes(tb), method="prompt", progress=False, call_kwargs=tb.call_kwargs)
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    rows = {"plain": _row(tb, plain)}
    controls = control_maps(next(iter(pipeline_denoisers(pipe).values())), bmap, seeds=seeds)
    for name, m in [("memctl map", bmap), *controls.items()]:
        row, _ = _measure(tb, pipe, spec, ref, knob_setup(pipe, m, -1.0))
        rows[name] = _row(tb, row)
        print(name, json.dumps({k: round(v, 3) for k, v in rows[name].items()}), flush=True)
    return {"command": "python bench/video_random_controls.py" + (f" {seeds}" if seeds != 4 else ""),
            "eval": spec.to_dict(), "fidelity": -1.0, "rows": rows}  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
