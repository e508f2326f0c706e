"""A lever that never reads the exact prompt: the caption rebuilt from its parts (composable diffusion). Calibration.

Memorization on digits-attr and moving-digits is a property of one exact caption: its words are ordinary, and every
part of it ("a two, small, bold" without the slant) was trained on many images. The condition lever pulls the
caption's heavy tokens toward another caption and so changes what it asks for (canary novel-valid 52 → 14 % at −1).
Here, the denoiser's prediction for caption `c = (digit d, attributes a_1..a_n)` is replaced by the one its
leave-one-attribute-out captions `c_-j` and the digit alone `d` give together. If the attributes are independent
given the sample (the assumption of composable diffusion, Liu et al. 2022), `s(c_-j) = s_u + g_d + Σ_{i≠j} g_i` and
`s(d) = s_u + g_d`, so

    s(c) = (Σ_j s(c_-j) - s(d)) / (n - 1)

exactly, with no constant to choose. The exact caption is never evaluated, so the association it alone carries
(the memorized image) is not used; what every part carries is. Fidelity f < 0 mixes: `s(c) + |f| (composed - s(c))`.
Cost: n + 1 conditional evaluations instead of 1 (digits-attr: 4; moving-digits: 3).

Captions with fewer than 2 attributes are left as they are. The partial captions are the testbed's own caption
grammar with attributes dropped (its training captions drop each attribute 15 % of the time, so they are in
distribution).

Calibration only: digits-attr-s0 (8 seeds from 0) and moving-digits (2 seeds from 0); never evaluation seeds (10000+).
`python bench/compose_lever.py [model ...]` → bench/results/compose_lever.json.
"""

import argparse
import json
import shlex
import sys
import time

import torch

from memctl.effect_video import is_video
from memctl.evaluate import sample_testbed, score_samples
from memctl.text_states import WAN_TOKENS

sys.path.insert(0, "bench")
from pull_subspace import calibration_setup, headline  # noqa: E402

torch.set_num_threads(1)


def arriving(pipe, prompts: list[str]) -> torch.Tensor:
    """The states the denoiser's forward receives as `encoder_hidden_states` for `prompts`."""
    if hasattr(pipe, "unet"):
        return pipe.encode_prompt(prompts)
    return pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, device=pipe._execution_device, max_sequence_length=WAN_TOKENS
    )[0]


def partials(tb, prompt: str) -> list[str] | None:
    """[c_-1, ..., c_-n, d] for a full caption with n >= 2 attributes, else None."""
    from memctl.zoo import attr, moving

    grammar = moving if is_video(tb.spec.get("name", "")) else attr
    try:
        c, combo = tb.combo_of(prompt)
    except ValueError:
        return None
    n = len(combo)
    if n < 2:
        return None
    drop = [tuple(i != j for i in range(n)) for j in range(n)]
    return [grammar.caption(c, combo, keep) for keep in drop] + [grammar.caption(c, combo, (False,) * n)]


class Composer:
    """Wraps the denoiser's forward: rows whose conditioning is a known full caption get the composed prediction."""

    def __init__(self, pipe, tb, prompts: list[str]):
        self.denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        self.forward = self.denoiser.forward
        parts = {p: partials(tb, p) for p in prompts}
        self.prompts = [p for p in prompts if parts[p] is not None]
        self.full = arriving(pipe, self.prompts)  # (P, L, D)
        self.parts = [arriving(pipe, parts[p]) for p in self.prompts]  # each (n + 1, L, D)
        self.f = 0.0

    def __enter__(self):
        self.denoiser.forward = self.wrapped
        return self

    def __exit__(self, *exc):
        self.denoiser.forward = self.forward

    def wrapped(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        e = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if self.f >= 0 or e is None:
            return out
        eps = out[0] if isinstance(out, tuple) else out.sample
        d = (e[:, None].float() - self.full[None].float()).flatten(2).norm(dim=2)  # (B, P)
        dist, idx = d.min(1)
        idx = idx.tolist()
        rows = (dist <= 1e-3 * self.full.flatten(1).norm(dim=1)[torch.tensor(idx)]).nonzero().flatten().tolist()
        if not rows:
            return out
        ks = [len(self.parts[idx[b]]) for b in rows]
        xs = torch.cat([x[b : b + 1].expand(k, *x.shape[1:]) for b, k in zip(rows, ks, strict=True)])
        es = torch.cat([self.parts[idx[b]] for b in rows]).to(e.dtype)
        ts = (
            torch.cat([t[b : b + 1].expand(k) for b, k in zip(rows, ks, strict=True)])
            if torch.is_tensor(t) and t.ndim
            else t
        )
        skip = ("hidden_states", "sample", "timestep", "encoder_hidden_states")
        rest = {k: v for k, v in kwargs.items() if k not in skip}
        r = self.forward(xs, ts, encoder_hidden_states=es, **rest)
        r = r[0] if isinstance(r, tuple) else r.sample
        eps = eps.clone()
        for b, chunk in zip(rows, r.split(ks), strict=True):
            composed = (chunk[:-1].sum(0) - chunk[-1]) / (len(chunk) - 2)
            eps[b] = eps[b] + abs(self.f) * (composed - eps[b])
        if isinstance(out, tuple):
            return (eps, *out[1:])
        out.sample = eps
        return out


def run(name: str, fidelities: list[float]) -> dict:
    tb, pipe, spec = calibration_setup(name)
    t0 = time.perf_counter()
    plain = sample_testbed(pipe, tb, spec)
    rows = {"plain": headline(tb, score_samples(tb, plain, plain))}
    print(name, "plain", rows["plain"], flush=True)
    prompts = [c[0] for c in tb.canaries] + [p for p, _ in tb.eval_prompts()] + tb.unseen_prompts()
    with Composer(pipe, tb, prompts) as comp:
        for f in fidelities:
            comp.f = f
            t1 = time.perf_counter()
            rows[f"compose {f:+.1f}"] = headline(tb, score_samples(tb, sample_testbed(pipe, tb, spec), plain))
            rows[f"compose {f:+.1f}"]["seconds"] = round(time.perf_counter() - t1, 1)
            print(name, "compose", f, rows[f"compose {f:+.1f}"], flush=True)
    return {"spec": spec.to_dict(), "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
            "composed_prompts": len(comp.prompts), "prompts": len(set(prompts))}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["digits-attr-s0", "moving-digits"])
    parser.add_argument("--fidelities", default="-1,-0.5")
    parser.add_argument("--out", default="compose_lever")
    a = parser.parse_args()
    fs = [float(x) for x in a.fidelities.split(",")]
    out = {"command": "python " + shlex.join(sys.argv), "results": {m: run(m, fs) for m in a.models}}
    with open(f"bench/results/{a.out}.json", "w") as fh:
        json.dump(out, fh, indent=1)
