"""What in-attention guidance's per-call key/value projections save, where the text side is large.

    python bench/kv_projections.py   # -> bench/results/kv_projections.{json,md}, about 3 min

In-attention guidance (`memctl.attention_guidance`) builds the keys and values of `[e; e']` from two projections
made once per conditioning (`W e + b`, `W Δ`) instead of projecting both halves at every step. This times one
forward of the Wan 2.1 1.3B-sized transformer (random weights, `memctl.speed_setup.build_wan`) with the 512 text
tokens a Wan call feeds and a small latent (64 video tokens), where the text side weighs most: the plain model, the
knob at +1 in attention mode, and the same with the per-call parts switched off (every call projects `[e; e']`, the
behaviour before stop 29). Interleaved rounds after one warm-up each, one CPU thread, the same text states in every
forward as in a sampling loop; ratios of best times to plain.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

import memctl.attention_guidance as ag
from memctl.atomic import atomic_write
from memctl.knob import apply_knob, remove_knob, set_fidelity
from memctl.speed_setup import build_wan, condition_map, wan_inputs

OUT = Path(__file__).parent / "results"
ROUNDS, TEXT, LATENT = 4, 512, (1, 8, 8)


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = build_wan()
    inputs = wan_inputs(model, *LATENT, TEXT)
    cmap = condition_map(model, tokens=TEXT)
    cached = ag._Project.pre_forward

    @torch.no_grad()
    def forward() -> float:
        t = time.perf_counter()
        model(**inputs, return_dict=False)
        return time.perf_counter() - t

    def per_step(self, module, *args, **kwargs):  # the layer projects [e; e'] at every call
        return args, kwargs

    def guided(every_call: bool):
        def run() -> float:
            ag._Project.pre_forward = per_step if every_call else cached  # before attaching: hooks bind it then
            apply_knob(model, cmap, fidelity_mode="attention")
            set_fidelity(model, 1.0)
            try:
                forward()  # the first call of a conditioning makes the parts; the rest of a call's steps reuse them
                return forward()
            finally:
                ag._Project.pre_forward = cached
                remove_knob(model)

        return run

    cases = {"plain": forward, "in-attention +1, per-call key/value parts": guided(False),
             "in-attention +1, projecting [e; e'] at every call": guided(True)}  # fmt: skip
    for run in cases.values():  # warm-up
        run()
    times = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, run in cases.items():
            times[name].append(run())
    best = min(times["plain"])
    rows = {
        n: {"seconds": [round(t, 3) for t in ts], "best_ratio": round(min(ts) / best, 3)} for n, ts in times.items()
    }
    result = {
        "command": "python bench/kv_projections.py",
        "machine": platform.platform(),
        "model": "wan-1.3b (random weights)",
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "rounds": ROUNDS,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write(OUT / "kv_projections.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write(OUT / "kv_projections.md", markdown(result).encode())
    print(markdown(result))


def markdown(result: dict) -> str:
    shapes = ", ".join(f"`{k}` {tuple(v)}" for k, v in result["inputs"].items())
    lines = [
        "# In-attention guidance: per-call key/value parts against projecting at every step",
        "",
        f"`{result['command']}` ({result['seconds']} s, {result['machine']}): {result['model']}, inputs {shapes}; "
        f"{result['rounds']} interleaved rounds after one warm-up, one CPU thread, one forward per round after the "
        "conditioning's first call.",
        "",
        "configuration | s / forward, each round | best over plain's best",
        "--- | --- | ---",
    ]
    for name, row in result["rows"].items():
        lines.append(f"{name} | {', '.join(f'{s:.2f}' for s in row['seconds'])} | {row['best_ratio']:.3f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
