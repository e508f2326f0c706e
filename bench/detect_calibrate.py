"""Per-seed readings of every detection signal on the calibration split, for choosing how the signals combine.

    python bench/detect_calibrate.py  # digits-s0, digits-attr-s0, seeds 0-7 -> bench/results/detect_calibration.json

The calibration split is digits-s0 and digits-attr-s0 at seeds 0-7: the seeds `memctl bench detect` never reads
(it reads `EVAL_SEEDS`, 100-107). The same prompt sets as the bench: canaries, held-out ordinary prompts, the
testbed's decoys, the reference half of the ordinary prompts and the decoys made from it (`auto_decoys`). Every
signal is read on every prompt and seed, so any combination and any seed split can be tried offline.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from memctl.detect_bench import _per_seed, prompt_groups
from memctl.signals import SIGNALS, word_counts

CALIBRATION = ("digits-s0", "digits-attr-s0")
SEEDS = tuple(range(8))
OUT = Path(__file__).parent / "results" / "detect_calibration.json"


def read(name: str, seeds=SEEDS, batch_size: int = 32) -> dict:
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    groups = prompt_groups(tb)
    reference = groups["reference"]
    prompts = [p for g in groups.values() for p in g]
    call = dict(getattr(tb, "call_kwargs", {}))
    per_seed, seconds = _per_seed(pipe, prompts, SIGNALS, seeds, word_counts(reference), batch_size, call)
    out, start = {}, 0
    for g, names in groups.items():
        part = slice(start, start + len(names))
        out[g] = {"prompts": names, **{s: _rounded(per_seed[s][:, part]) for s in SIGNALS}}
        start += len(names)
    return {"seeds": list(seeds), "seconds": seconds, "groups": out}


def _rounded(values: torch.Tensor) -> list:
    return [[float(f"{x:.5g}") for x in row] for row in values.tolist()]


def main(models=CALIBRATION) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = {m: read(m) for m in models}
    result["_command"] = "python bench/detect_calibrate.py " + " ".join(models)
    result["_seconds"] = round(time.perf_counter() - t0, 1)
    OUT.write_text(json.dumps(result))
    print(f"wrote {OUT} in {result['_seconds']} s")


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or CALIBRATION)
