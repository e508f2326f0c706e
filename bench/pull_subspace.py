"""Does the condition lever break attribute-correct generation because it moves whole tokens? A calibration run.

At fidelity -1 the lever replaces (and, with `pull_max` 2, overshoots) each heavy token by the nearest general
prompt's token: `e + α w (g - e)`. On captions of ordinary words the nearest general prompt differs in an attribute,
so the pulled prompt asks for another digit or motion and canary novel-valid falls to 0-14 % (effect.md). This
compares, at fidelity -1 with the probed map:
- `full`: the shipped pull, `e + α w (g - e)`;
- `subspace`: only the components along the map's memorized directions move, `e + α w P (g - e)` with `P` the
  orthogonal projection onto the span of `read` (the smallest change of `e` that sets its coordinates along the
  memorized directions to `g`'s);
- `complement`: the rest, `e + α w (I - P)(g - e)` (a control: the part of the pull `subspace` leaves out);
- `mean K`: the whole pull, toward the mean of the K nearest general prompts instead of the nearest one (each of
  the caption's attributes is shared by most of its neighbours, so the target keeps them by majority);
- `tail N` / `head N`: the whole pull on the tokens from position N on / before N only (a diagnostic: on
  digits-attr every caption has its end-of-text token at position 10, so `tail 10` pulls the summary and padding
  tokens and leaves the words alone);
- `window A B`: the shipped pull, acting only at noise levels in [A, B] (the knob's `start` / `stop`).

Calibration only: digits-attr-s0 (8 seeds from 0) and moving-digits (2 seeds from 0), never the evaluation seeds
(10000+) nor the held-out models. `python bench/pull_subspace.py [--modes "full,mean 4"] [--out NAME] [model ...]`
→ bench/results/NAME.json (default pull_subspace).
"""

import argparse
import json
import shlex
import sys
import time
from contextlib import contextmanager

import torch

import memctl
from memctl import hooks, subspace
from memctl.effect import testbed_probes
from memctl.effect_video import VIDEO_STEPS, is_video, video_probes
from memctl.evaluate import EvalSpec, sample_testbed, score_samples
from memctl.probe import probe

torch.set_num_threads(1)
MODE = {"value": "full"}
_original = hooks.ConditionHook.pre_forward


def _projection(read: torch.Tensor) -> torch.Tensor:
    r = read.double()
    return (r @ torch.linalg.pinv(r.T @ r) @ r.T).to(read.dtype)


def pre_forward(self, module, *args, **kwargs):
    """`ConditionHook.pre_forward` with the pull's direction restricted by `MODE` (bound before the knob attaches)."""
    if MODE["value"] == "full":
        return _original(self, module, *args, **kwargs)
    e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if e is None:
        return args, kwargs
    read, tau, bank = (getattr(module, f"{self.buffer}_{k}") for k in self._TENSORS)
    if MODE["value"].startswith("mean"):
        k = int(MODE["value"].split()[1])
        w = subspace.memorization_weight(e, read, tau)
        b = subspace.fit_length(bank.to(e.dtype), e.shape[1])
        d = ((e[:, None] - b[None]).pow(2).sum(-1) * (1 - w)[:, None]).sum(-1)  # (B, P)
        g = b[d.topk(k, dim=1, largest=False).indices].mean(1)
        new = subspace.pull_with(e, w, g, 1 - getattr(module, self.buffer))
        return _put(args, kwargs, new)
    w, g = self.cache.parts(e, read, tau, bank)
    if MODE["value"].split()[0] in ("tail", "head"):  # only the tokens from position N on (or before it)
        kind, n = MODE["value"].split()
        keep = torch.arange(e.shape[1], device=e.device) >= int(n)
        w = w * (keep if kind == "tail" else ~keep).to(w.dtype)
        return _put(args, kwargs, subspace.pull_with(e, w, g, 1 - getattr(module, self.buffer)))
    p = _projection(read).to(e.dtype)
    d = (g - e) @ p
    if MODE["value"] == "complement":
        d = (g - e) - d
    new = e + ((1 - getattr(module, self.buffer)).to(e.dtype) * w)[..., None] * d
    return _put(args, kwargs, new)


def _put(args, kwargs, new):
    if "encoder_hidden_states" in kwargs or len(args) < 2:
        kwargs["encoder_hidden_states"] = new
    else:
        args = (args[0], new, *args[2:])
    return args, kwargs


@contextmanager
def knob(pipe, bmap, f, mode):
    start, stop = (float(x) for x in mode.split()[1:]) if mode.startswith("window") else (0.0, 1.0)
    MODE["value"] = "full" if mode.startswith("window") else mode
    memctl.apply_knob(pipe, bmap, start=start, stop=stop)
    try:
        with memctl.fidelity(pipe, f):
            yield
    finally:
        memctl.remove_knob(pipe)
        MODE["value"] = "full"


def headline(tb, r: dict) -> dict:
    c = r["canary"]
    top = str(max(tb.exposures))
    row = {
        "most_exposed_copy": c[top]["copy_1/3"],
        "most_exposed_nearest_bound": c[top].get("nearest_bound"),
        "canary_novel_valid": c["all"]["novel_valid"],
        "canary_valid": c["all"]["valid"],
        "ordinary_valid": r["ordinary"]["valid"],
        "collateral": r["ordinary"]["collateral"],
    }
    if r.get("unseen") is not None:
        row["compositional"] = r["unseen"]["compositional"]
    for k in ("motion_valid", "frame_valid"):
        if k in c["all"]:
            row[f"canary_{k}"] = c["all"][k]
    return row


def calibration_setup(name: str):
    """`(testbed, pipeline, spec)` of a calibration run: 8 seeds from 0 (clips: 2 seeds, the video bench's steps)."""
    tb = memctl.zoo.load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    if is_video(name):
        return tb, pipe, EvalSpec(seeds=2, seed_base=0, guidance=tb.guidance, steps=VIDEO_STEPS)
    return tb, pipe, EvalSpec(seeds=8, seed_base=0, guidance=tb.guidance)


def run(name: str, modes: list[str]) -> dict:
    tb, pipe, spec = calibration_setup(name)
    t0 = time.perf_counter()
    if is_video(name):
        bmap = probe(pipe, video_probes(tb), method="prompt", progress=False, call_kwargs=tb.call_kwargs)
    else:
        bmap = probe(pipe, testbed_probes(tb), method="condition", progress=False)
    plain = sample_testbed(pipe, tb, spec)
    rows = {"plain": headline(tb, score_samples(tb, plain, plain))}
    print(name, "plain", rows["plain"], flush=True)
    for f in (-1.0, -0.5):
        for mode in modes:
            with knob(pipe, bmap, f, mode):
                r = score_samples(tb, sample_testbed(pipe, tb, spec), plain)
            rows[f"{mode} {f:+.1f}"] = headline(tb, r)
            print(name, mode, f, rows[f"{mode} {f:+.1f}"], flush=True)
    return {"spec": spec.to_dict(), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


if __name__ == "__main__":
    hooks.ConditionHook.pre_forward = pre_forward  # before any knob attaches (diffusers binds at registration)
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["digits-attr-s0", "moving-digits"])
    parser.add_argument("--modes", default="full,subspace,complement")
    parser.add_argument("--out", default="pull_subspace")
    a = parser.parse_args()
    modes = a.modes.split(",")
    out = {"command": "python " + shlex.join(sys.argv), "results": {m: run(m, modes) for m in a.models}}
    with open(f"bench/results/{a.out}.json", "w") as fh:
        json.dump(out, fh, indent=1)
