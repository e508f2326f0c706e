"""The embedded "moving-digits" video testbed: `python -m memctl.zoo.video train --seed 0`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memctl.zoo.video", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a moving-digits model from a seed")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", type=Path, default=None, help="output folder (default assets/moving-digits-s<seed>)")
    tr.add_argument("--steps", type=int, default=6000)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock cap; stops early and saves")
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--device", default="cpu", help="torch device (the noise stream is drawn on the CPU either way)")
    tr.add_argument("--width", type=int, default=64, help="transformer width (4 heads)")
    tr.add_argument("--layers", type=int, default=4, help="transformer blocks")
    tr.add_argument("--sigma-shift", type=float, default=3.0, help="shift of the training noise levels (1: uniform)")
    tr.add_argument("--init-from", type=Path, default=None, help="start from this moving-digits folder's weights")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in <out>.work")
    args = parser.parse_args(argv)
    from memctl.zoo.train_video import train

    out = args.out or Path("assets") / f"moving-digits-s{args.seed}"
    info = train(
        args.seed, out, steps=args.steps, batch_size=args.batch_size, max_minutes=args.max_minutes,
        resume=args.resume, lr=args.lr, device=args.device, width=args.width, layers=args.layers,
        sigma_shift=args.sigma_shift, init_from=args.init_from,
    )  # fmt: skip
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
