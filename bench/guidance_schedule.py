"""On which steps does memorization guidance (fidelity +1) need its extra pass? Measured before choosing
`fidelity_mode="cached"`, on the selection models only, at probe-side seeds (5000-5007; evaluation uses 10,000 on).

    python bench/guidance_schedule.py digits-s0 digits-attr-s0   → bench/results/guidance_schedule.json

Rows, each at fidelity +1 with the map probed as `memctl bench effect` probes it (25 DDIM steps):
- "every step": `fidelity_mode="guidance"`, the extra pass at every step;
- "t >= a" / "t <= b": the extra pass only at noise levels t >= a (high noise) or t <= b (low noise), nothing added
  on the other steps (the hook is patched here for the measurement; the product has no such mode);
- "cached every K": `fidelity_mode="cached"`'s contrast computed on every K-th step and reused between (K = 10 is
  what ships, `memctl.guidance.GUIDANCE_EVERY`).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch

import memctl
from memctl import guidance, knob_state
from memctl.effect import _headline, _measure, knob_setup, testbed_probes
from memctl.evaluate import EvalSpec
from memctl.probe import probe

OUT = Path(__file__).parent / "results" / "guidance_schedule.json"
WINDOWS = (("t >= 0.9", 0.9, 1.0), ("t >= 0.6", 0.6, 1.0), ("t <= 0.1", 0.0, 0.1), ("t <= 0.4", 0.0, 0.4))
CACHED = (5, 10, 13)


@contextmanager
def _only_between(lo: float, hi: float):
    """The every-step guidance hook, but its extra pass (and contrast) only at noise levels in [lo, hi]."""
    on_timestep, pre_forward = knob_state._KnobState.on_timestep, guidance.GuidanceHook.pre_forward

    def clock(self, module, t):
        self.t_now = float(t)
        return on_timestep(self, module, t)

    def pre(self, module, *args, **kwargs):
        args, kwargs = pre_forward(self, module, *args, **kwargs)
        if not lo <= getattr(self.state, "t_now", 1.0) <= hi:
            self._inputs = None
        return args, kwargs

    with (
        mock.patch.object(knob_state._KnobState, "on_timestep", clock),
        mock.patch.object(guidance.GuidanceHook, "pre_forward", pre),
    ):
        yield


@contextmanager
def _every(k: int):
    with mock.patch.object(guidance, "GUIDANCE_EVERY", k), mock.patch("memctl.knob.GUIDANCE_EVERY", k):
        yield


def _row(tb, pipe, spec, ref, setup, patch) -> dict:
    t0 = time.perf_counter()
    with patch:
        r, _ = _measure(tb, pipe, spec, ref, setup)
    return {**_headline(tb, r), "copy_4x": r["canary"]["4"]["copy_1/3"], "cost": r["cost"],
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main(models: list[str]) -> None:
    torch.set_num_threads(1)
    out = {"command": "python bench/guidance_schedule.py " + " ".join(models), "models": {}}
    for name in models:
        tb = memctl.zoo.load_testbed(name)
        pipe = tb.pipeline()
        pipe.set_progress_bar_config(disable=True)
        spec = EvalSpec(seeds=8, seed_base=5000, guidance=tb.guidance, steps=25)
        bmap = probe(pipe, testbed_probes(tb), method="condition", progress=False)
        plain, ref = _measure(tb, pipe, spec, None, nullcontext)
        rows = {"plain": {**_headline(tb, plain), "copy_4x": plain["canary"]["4"]["copy_1/3"], "cost": plain["cost"]}}
        guided = knob_setup(pipe, bmap, 1.0, "guidance")
        rows["every step"] = _row(tb, pipe, spec, ref, guided, nullcontext())
        for label, lo, hi in WINDOWS:
            rows[label] = _row(tb, pipe, spec, ref, guided, _only_between(lo, hi))
        for k in CACHED:
            rows[f"cached every {k}"] = _row(tb, pipe, spec, ref, knob_setup(pipe, bmap, 1.0, "cached"), _every(k))
        out["models"][name] = {"fidelity_guidance": bmap.meta.get("fidelity_guidance"), "eval": spec.to_dict(),
                               "rows": rows}  # fmt: skip
        print(name, json.dumps(rows), flush=True)
        OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["digits-s0", "digits-attr-s0"])
