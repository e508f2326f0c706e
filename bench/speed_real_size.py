"""The knob's cost per denoiser forward at the sizes users sample at, on this CPU (one thread).

    python bench/speed_real_size.py            # → bench/results/speed_real_size.{json,md}, about 60 min
    python bench/speed_real_size.py --models sd15-unet --repeats 5 --name speed_real_size_sd15   # one model
    python bench/speed_real_size.py --models wan-1.3b --skip "knob +1, condition map, extra-pass guidance"

`memctl bench speed` times small inputs (16² UNet latents, 16 Wan video tokens) so that it fits CI-like minutes; there
a hook's fixed cost and the text tokens' key/value projections weigh far more than in a real call. This script times
the same configurations (`memctl.speed.unet_cases` / `wan_cases`, the same maps, the same interleaved rounds and
ratio of best times) at a real size:

- SD 1.5 UNet: 64² latents (a 512² image), classifier-free guidance's batch of 2, 77 text tokens;
- Wan 2.1 1.3B: one 480 × 832 frame (latent 1 × 60 × 104, 1,560 video tokens) with the 512 text tokens a Wan call
  feeds (`max_sequence_length`), the smallest call Wan makes (text-to-image); a real 81-frame clip has 21× the video
  tokens and the same text, so the text side weighs less still.

The loop rows (cached guidance, timed as a 10-step loop) and PAG are left out to keep it under an hour; FreeU stays
for comparison. Rows are named as in `speed.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from memctl.speed import _bar, time_cases, unet_cases, wan_cases
from memctl.speed_md import model_md
from memctl.speed_setup import baked_unet, build_unet, build_wan, condition_map, residual_map, unet_inputs, wan_inputs

OUT = Path(__file__).parent / "results"
SKIP = ("PAG", "per step of a", "new text states")  # loops, PAG, the once-per-call row: see the docstring
WAN_KEEP = (
    "plain",
    "knob 0, condition map",
    "knob -1, condition map",
    "knob +1, condition map, in-attention guidance",
    "knob +1, condition map, extra-pass guidance",
    "baked (condition map at -1, no hooks)",
)


def _describe(model, inputs, cmap, rows, t0) -> dict:
    return {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "map": {"condition units": cmap.n_blocks, "bank": list(cmap.lever_tensors["bank"].shape)},
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "bar": _bar(rows),
    }


MODELS = ("sd15-unet", "wan-1.3b")


def _kept(cases: list[tuple], keep, skip: tuple[str, ...]) -> list[tuple]:
    """The cases this script times (`keep(row)`), less those named in `skip` (each must name one of them)."""
    kept = [c for c in cases if keep(c[0])]
    unknown = [s for s in skip if s not in {c[0] for c in kept}]
    if unknown:
        raise ValueError(f"Expected rows to skip among {[c[0] for c in kept][1:]}, but got {unknown}.")
    return [c for c in kept if c[0] not in skip]


def main(
    repeats: int = 3, models: tuple[str, ...] = MODELS, name: str = "speed_real_size", skip: tuple[str, ...] = ()
) -> dict:
    """`skip`: configurations (row names as in `speed.md`) left out of this run, e.g. the extra pass (2x, slow)."""
    if "plain" in skip:
        raise ValueError("Expected rows to skip other than 'plain' (every ratio is to it), but got 'plain'.")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    measured = {}
    if "sd15-unet" in models:
        unet = build_unet()
        inputs = unet_inputs(unet, 64)
        cmap, rmap = condition_map(unet), residual_map(unet)
        baked = baked_unet(unet, cmap)
        cases = _kept(unet_cases(unet, inputs, cmap, rmap, baked), lambda row: not any(s in row for s in SKIP), skip)
        t0 = time.perf_counter()
        measured["sd15-unet 512²"] = _describe(unet, inputs, cmap, time_cases(cases, repeats), t0)
        print(json.dumps(measured["sd15-unet 512²"]["bar"], indent=1), flush=True)
        del unet, baked, cases
    if "wan-1.3b" in models:
        wan = build_wan()
        w_inputs = wan_inputs(wan, frames=1, height=60, width=104, text=512)
        wcmap = condition_map(wan, tokens=512)
        w_baked = baked_unet(wan, wcmap)
        cases = _kept(wan_cases(wan, w_inputs, residual_map(wan), wcmap, w_baked), WAN_KEEP.__contains__, skip)
        t0 = time.perf_counter()
        measured["wan-1.3b 480×832"] = _describe(wan, w_inputs, wcmap, time_cases(cases, repeats), t0)
        print(json.dumps(measured["wan-1.3b 480×832"]["bar"], indent=1), flush=True)
    from memctl.metadata import provenance

    command = "python bench/speed_real_size.py"
    if repeats != 3:
        command += f" --repeats {repeats}"
    if tuple(models) != MODELS:
        command += " --models " + " ".join(models)
    if name != "speed_real_size":
        command += f" --name {name}"
    command += "".join(f' --skip "{s}"' for s in skip)
    report = {
        "suite": "speed at real sizes",
        "command": command,
        "repeats": repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": 1},
        "versions": provenance(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "models": measured,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f"{name}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(OUT / f"{name}.json")
    (OUT / f"{name}.md").write_text(render(report))
    return report


def render(report: dict) -> str:
    head = [
        "# The knob's cost at real sizes (CPU)\n\n",
        f"`{report['command']}`: {report['repeats']} interleaved rounds after one warm-up, one CPU thread "
        f"({report['machine']['platform']}), {report['seconds']:.0f} s in all. Ratios per denoiser forward, each "
        "round against the plain model in the same round; the bars use the ratio of best times, as in `speed.md`.\n",
    ]
    return "".join(head + [line for name, m in report["models"].items() for line in model_md(name, m)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--name", default="speed_real_size", help="output name under bench/results")
    parser.add_argument("--skip", action="append", default=[], metavar="ROW", help="leave out this configuration")
    args = parser.parse_args()
    main(args.repeats, tuple(args.models), args.name, tuple(args.skip))
