"""Device run of the speed bench: absolute seconds and peak memory of the knob at real sizes, within a hard time cap.

    python3 bench/gpu/speed.py --device cuda --out "$OUT/speed-gpu.json" --budget 140
    python3 bench/gpu/speed.py --device cpu --tiny --out /tmp/speed-gpu.json    # the CPU check of this script

Parts, in this order, each written to the JSON as soon as it is done (so a cut-off run keeps what it measured):
1. the SD 1.5-sized UNet (fp16) at 512² (64² latents) and 2. at 1024² (128² latents), CFG batch 2, 77 text tokens:
   seconds per forward, and per image = per forward × `--steps` (the denoiser's share of a sampling loop: no text
   encoder, no VAE), for plain, FreeU, PAG, the knob at 0 / -1 / +1 (condition map; +1 with extra-pass and
   in-attention guidance), and the residual map at 0 / -1 / +1;
3. the Wan 2.1 1.3B-sized transformer (bf16) at 480×832, 81 frames (21 latent frames of 60×104, 32,760 tokens),
   512 text tokens, batch 1 (Wan pipelines call the denoiser once per pass): seconds per forward, plain, the
   condition-map knob at 0 / -1 / +1 (both guidance modes) and the residual-map knob at 0 / -1 / +1;
4. if time is left, the baked UNet (the condition map's edit at fidelity -1) against the plain one at both sizes.
Timings are interleaved (memctl.speed.time_cases): one warm-up per configuration, then rounds until `--repeats` or
the time cap. torch.compile is not run here: compiling these models takes longer than the cap allows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a script

from memctl import speed  # noqa: E402

SD_SIZES = {"512": 64, "1024": 128}  # image side -> latent side
WAN_SIZE = {"frames": 21, "height": 60, "width": 104, "text": 512}  # 480x832, 81 frames
TINY = {"sd": {"512": 8, "1024": 16}, "wan": {"frames": 2, "height": 8, "width": 8, "text": 16}}


def _write(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


def _sd_parts(args, report, deadline, device, dtype):
    """The UNet rows at each size (every configuration but the baked model); returns what `_baked_part` needs."""
    sizes = TINY["sd"] if args.tiny else SD_SIZES
    if time.monotonic() > deadline - 15:
        report["runs"].update({f"sd15-unet {s}x{s}": {"error": "skipped: the time cap was reached"} for s in sizes})
        return None
    unet = speed.build_unet(tiny=args.tiny, device=device, dtype=dtype)
    cmap, rmap = speed.condition_map(unet), speed.residual_map(unet)
    for side, latent in sizes.items():
        key = f"sd15-unet {side}x{side}"
        if time.monotonic() > deadline - 10:
            report["runs"][key] = {"error": "skipped: the time cap was reached"}
            continue
        inputs = speed.unet_inputs(unet, latent, dtype=dtype, device=device)
        rows = speed.time_cases(speed.unet_cases(unet, inputs, cmap, rmap), args.repeats, device, deadline - 5)
        report["runs"][key] = {
            "what": f"{str(dtype)[6:]}, latents {tuple(inputs['sample'].shape)}, {args.steps} steps per image "
            f"(per forward × steps; a forward is one CFG step)",
            "unit": f"s / image ({args.steps} steps)",
            "rows": _per_image(rows, args.steps),
        }
        _write(args.out, report)
    return unet, cmap, sizes


def _per_image(rows: dict, steps: int) -> dict:
    for row in rows.values():
        if row.get("seconds"):
            row["per_image_seconds"] = round(row["seconds"]["median"] * steps, 4)
    return rows


def _baked_part(args, report, deadline, device, dtype, built) -> None:
    """The baked UNet against the plain one at each size, if time is left (the bake's edit is fit on the CPU)."""
    key = "sd15-unet baked"
    if built is None or time.monotonic() > deadline - 30:
        report["runs"][key] = {"error": "skipped: the time cap was reached"}
        return
    unet, cmap, sizes = built
    baked = speed.baked_unet(unet, cmap)
    runs = {}
    for side, latent in sizes.items():
        if time.monotonic() > deadline - 5:
            break
        inputs = speed.unet_inputs(unet, latent, dtype=dtype, device=device)
        cases = [
            ("plain", speed.nullcontext, speed._forward(unet, inputs)),
            ("baked (condition map at -1, no hooks)", speed.nullcontext, speed._forward(baked, inputs)),
        ]
        rows = _per_image(speed.time_cases(cases, args.repeats, device, deadline - 3), args.steps)
        runs.update({f"{name} {side}x{side}": row for name, row in rows.items()})  # fmt: skip
    report["runs"][key] = {"what": f"{str(dtype)[6:]}, baked vs plain at each size, {args.steps} steps per image",
                           "unit": f"s / image ({args.steps} steps)", "rows": runs}  # fmt: skip
    _write(args.out, report)


def _wan_part(args, report, deadline, device, dtype) -> None:
    size = TINY["wan"] if args.tiny else WAN_SIZE
    key = "wan-1.3b {frames}x{height}x{width} latent".format(**size)
    if time.monotonic() > deadline - 25:
        report["runs"][key] = {"error": "skipped: the time cap was reached"}
        return
    model = speed.build_wan(tiny=args.tiny, device=device, dtype=dtype)
    rmap, cmap = speed.residual_map(model), speed.condition_map(model, tokens=size["text"])
    inputs = speed.wan_inputs(model, dtype=dtype, device=device, **size)
    try:
        rows = speed.time_cases(speed.wan_cases(model, inputs, rmap, cmap), args.repeats, device, deadline - 5)
    except torch.OutOfMemoryError as e:
        report["runs"][key] = {"error": f"out of memory: {str(e)[:200]}"}
        return
    report["runs"][key] = {
        "what": f"{str(dtype)[6:]}, latent {tuple(inputs['hidden_states'].shape)}, {size['text']} text tokens, "
        "batch 1 (one of the two denoiser calls per step)",
        "unit": "s / forward",
        "rows": rows,
        "not_measured": speed.WAN_NOT_MEASURED,
    }
    _write(args.out, report)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models and latents (a check of this script)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=140.0, help="seconds this script may take in all")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    import diffusers

    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "tiny": args.tiny,
        "budget_seconds": args.budget,
        "method": f"interleaved timing, one warm-up per configuration then up to {args.repeats} rounds (fewer if "
        "the time cap came first: see repeats); peak memory = torch.cuda.max_memory_allocated during the forward.",
        "complete": False,
        "runs": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _write(args.out, report)
    t0 = time.monotonic()
    half = torch.float16 if cuda else torch.float32
    built = _sd_parts(args, report, deadline, device, half)
    _wan_part(args, report, deadline, device, torch.bfloat16 if cuda else torch.float32)
    _baked_part(args, report, deadline, device, half, built)
    report["complete"] = all("error" not in r for r in report["runs"].values())
    report["seconds"] = round(time.monotonic() - t0, 1)
    _write(args.out, report)
    print(json.dumps({k: {c: r.get("per_image_seconds", r["seconds"]) for c, r in v.get("rows", {}).items()}
                      for k, v in report["runs"].items()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
