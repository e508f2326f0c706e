"""Which lever raises recall at fidelity > 0? Three candidates for the condition map, measured on digits-s0.

`python bench/fidelity_levers.py` → bench/results/fidelity_levers.json (8 evaluation seeds, guidance 1.0).

- push: memorized tokens moved further from the nearest general conditioning (`e + α w (g - e)`, α < 0), with the
  map's factor damped 10× (the previous release's `positive_gain` 0.1), no extra pass;
- logit bias: `β (s - 1) w` added to the cross-attention logits of memorized tokens (β = 2, 5, 10 nats at most,
  s the block's factor, w the token's memorization weight), no extra pass;
- guidance: `out + γ f (out - pulled)` (`memctl.guidance`, γ = 0.5), one extra pass per step: what ships.
"""

import json
import time

import torch

import memctl
from memctl.evaluate import EvalSpec, sample_testbed, score_samples
from memctl.hooks import ConditionHook
from memctl.subspace import memorization_weight, pull_to_general

torch.set_num_threads(1)
BETA = [0.0]


def _bias_pre_forward(self, module, *args, **kwargs):
    """ConditionHook with the logit-bias lever above factor 1 (and the usual pull below it)."""
    e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if e is None:
        return args, kwargs
    read, tau, bank = (getattr(module, f"{self.buffer}_{k}") for k in self._TENSORS)
    s = getattr(module, self.buffer)
    w = memorization_weight(e, read, tau)  # (B, L)
    bias = (BETA[0] * (s - 1).clamp(min=0) * w)[:, None, :].to(e.dtype)
    mask = kwargs.get("attention_mask")
    kwargs["attention_mask"] = bias if mask is None else mask + bias
    kwargs["encoder_hidden_states"] = pull_to_general(e, read, tau, bank, (1 - s).clamp(min=0))
    return args[:1], kwargs


def _summary(row: dict) -> dict:
    c = row["canary"]
    return {
        "copy_1/3": {e: c[e]["copy_1/3"] for e in ("1", "4", "16")},
        "copy_1/2": {e: c[e]["copy_1/2"] for e in ("1", "4", "16")},
        "canary_copy_1/3_all": c["all"]["copy_1/3"],
        "ordinary_valid": row["ordinary"]["valid"],
        "collateral": row["ordinary"].get("collateral", 0.0),
    }


def main() -> None:
    t0 = time.perf_counter()
    tb = memctl.zoo.load_testbed("digits-s0")
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = EvalSpec(seeds=8)
    ref = sample_testbed(pipe, tb, spec)
    rows = {"fidelity 0": _summary(score_samples(tb, ref, ref))}

    def measure(name: str, bmap, fidelities=(0.5, 1.0)) -> None:
        memctl.apply_knob(pipe, bmap)
        for f in fidelities:
            with memctl.fidelity(pipe, f):
                rows[f"{name} {f}"] = _summary(score_samples(tb, sample_testbed(pipe, tb, spec), ref))
            print(name, f, rows[f"{name} {f}"], flush=True)
        memctl.remove_knob(pipe)

    shipped = tb.block_map()
    push = memctl.BlockMap.load(tb.path / "blockmap.safetensors")
    push.meta.update(positive_gain=0.1, fidelity_guidance=0.0)
    measure("push", push)
    original = ConditionHook.pre_forward
    ConditionHook.pre_forward = _bias_pre_forward
    try:
        bias = memctl.BlockMap.load(tb.path / "blockmap.safetensors")
        bias.meta.update(positive_gain=1.0, fidelity_guidance=0.0)
        for beta in (2.0, 5.0, 10.0):
            BETA[0] = beta
            measure(f"logit-bias {beta:g}", bias)
    finally:
        ConditionHook.pre_forward = original
    measure("guidance", shipped)
    out = {"command": "python bench/fidelity_levers.py", "model": "digits-s0", "seeds": spec.seeds,
           "seconds": round(time.perf_counter() - t0, 1), "rows": rows}  # fmt: skip
    with open("bench/results/fidelity_levers.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
