"""Generalization-heavy units: `python bench/generalization_units.py [MODEL]` (default digits-attr-s0).

An ablation map (`probe(method="ablation")`: each unit's residual update zeroed in turn) whose *memorized* probes are
the canaries with their bound renders and whose *general* probes are never-shown attribute combinations, drawn from
held-out digits with their captions: the composition the model must do. A unit with a negative score is one whose
ablation hurts composition more than canary recall: generalization-heavy. The map, its heat-map and what the knob
(the residual lever this map carries) does at fidelity -1 and +1 to canary copies and to compositional validity are
written to bench/results/generalization-<model>.{json,png}. Probe seed 0, evaluation seeds from 10,000 (4 each).
"""

import json
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import memctl
from memctl.effect import _headline, _measure
from memctl.evaluate import EvalSpec
from memctl.metadata import provenance
from memctl.plots import heatmap
from memctl.zoo import attr

torch.set_num_threads(1)
name = sys.argv[1] if len(sys.argv) > 1 else "digits-attr-s0"
tb = memctl.zoo.load_testbed(name)
pipe = tb.pipeline()
sources, labels = attr.load_sources()
held = tb.spec["held_out"]
general = []
for c, combo in tb.unseen:  # three held-out digits of the class, drawn at the never-shown combination
    idx = [i for i in held if int(labels[i]) == c][:3]
    images = attr.render(sources[idx], [combo] * len(idx))
    general += [(attr.caption(c, combo), im) for im in images]
probes = memctl.ProbeSet(memorized=[(p, im) for p, im, _, _ in tb.canaries], general=general)
t0 = time.perf_counter()
bmap = memctl.probe(pipe, probes, method="ablation", progress=False)
probe_seconds = round(time.perf_counter() - t0, 1)
scores = bmap.scores.mean(1)
order = scores.argsort()
spec = EvalSpec(seeds=4, guidance=tb.guidance)


def knob(f):
    @contextmanager
    def setup():
        memctl.apply_knob(pipe, bmap)
        try:
            with memctl.fidelity(pipe, f):
                yield None
        finally:
            memctl.remove_knob(pipe)

    return setup


plain, ref = _measure(tb, pipe, spec, None, nullcontext)
rows = {"plain 0": _headline(tb, plain)}
for f in (-1.0, 1.0):
    rows[f"ablation map {f:+.1f}"] = _headline(tb, _measure(tb, pipe, spec, ref, knob(f))[0])
out = Path("bench/results")
record = {
    "command": f"python bench/generalization_units.py {name}",
    "model": name,
    "probe": {
        "method": "ablation",
        "memorized": "canaries + bound renders",
        "seed": 0,
        "seconds": probe_seconds,
        "general": f"{len(general)} renders of held-out digits at the {len(tb.unseen)} never-shown "
        "combinations, with their captions",
    },  # fmt: skip
    "generalization_heavy": [(bmap.names[i], round(float(scores[i]), 4)) for i in order if scores[i] < 0],
    "memorization_heavy": [(bmap.names[i], round(float(scores[i]), 4)) for i in order.flip(0) if scores[i] > 0],
    "eval": spec.to_dict(),
    "rows": rows,
    "versions": provenance(),
}
(out / f"generalization-{name}.json").write_text(json.dumps(record, indent=1) + "\n")
heatmap(bmap, title=f"{name}: ablation map, general = never-shown combinations").save(
    out / f"generalization-{name}.png"
)
print(json.dumps(record, indent=1))
