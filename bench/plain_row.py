"""The effect bench's plain row for testbed folders: is a new training run of a model closer to its bars?

    python bench/plain_row.py PATH [PATH ...]     # e.g. a training run's output beside assets/moving-digits-s0

Each folder is loaded with `memctl.zoo.load_testbed` and sampled with the evaluation settings (seeds, steps, guidance)
of its model's committed effect record (`bench/results/effect/<model>.json`, the shipped model's `memctl bench
effect` run), so the row compares with that record's plain row. Prints the headline (most/least-exposed copies,
novel-valid, ordinary valid, compositional) and the per-exposure canary measures; writes nothing.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from memctl.effect import _headline, _measure
from memctl.evaluate import EvalSpec

RECORDS = Path(__file__).parent / "results" / "effect"


def main(paths: list[str]) -> None:
    from memctl.zoo import load_testbed

    torch.set_num_threads(1)
    for path in paths:
        t = time.perf_counter()
        tb = load_testbed(path)
        record = RECORDS / f"{tb.spec['name']}.json"
        if not record.is_file():
            record = RECORDS / f"{tb.spec['name']}-s{tb.spec.get('seed', 0)}.json"
        if not record.is_file():
            sys.exit(f"Expected an effect record for {path} in {RECORDS}, but found none for {tb.spec['name']!r}.")
        spec = EvalSpec(**json.loads(record.read_text())["eval"])
        pipe = tb.pipeline()
        pipe.set_progress_bar_config(disable=True)
        row, _ = _measure(tb, pipe, spec, None, nullcontext)
        print(path, f"{time.perf_counter() - t:.0f} s", json.dumps(_headline(tb, row)), flush=True)
        print("  canaries by exposure:", json.dumps(row["canary"]), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(f"usage: python bench/plain_row.py PATH [PATH ...] (testbed folders), but got {sys.argv[1:]}")
    main(sys.argv[1:])
