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
`python bench/compose_lever.py [model ...]` → bench/results/compose_lever.json (`--out NAME` for another name).

Variants tried after the first runs (all at fidelity -1; results in bench/results/compose_{analogy,window}_*.json):
- `--neighbours analogy` / `analogy-same`: the attributes swapped for other trained values instead of dropped (every
  term a fully named, trained caption). Worse than dropping: swapping the digit too breaks the clips (moving-digits
  ordinary valid 30 %); keeping it, digits-attr-s0 canary novel-valid 25 % (dropping: 42 %) and moving-digits motion
  21 % (dropping: 25 %).
- `--windows lo,hi;...`: composed only while timestep / 1000 lies in the window. On moving-digits the high-noise
  windows keep the motion: [0.7, 1] no most-exposed clip nearest its bound, canary novel-valid 50 %, motion 83 %
  (whole range: 8 %, 25 %); [0.85, 1] 38 % nearest bound. On digits-attr-s0 they leave copies ([0.7, 1] 25 %, [0.5,
  1] 14 %, whole range 8 %): the image model's copies are decided at every noise level.
"""

import argparse
import itertools
import json
import random
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


def _with(target: tuple, idx: list[int], values: tuple) -> tuple:
    x = list(target)
    for i, v in zip(idx, values, strict=True):
        x[i] = v
    return tuple(x)


def analogies(tb, grammar, target: tuple, keep_digit: bool) -> list[list[tuple]]:
    """Every analogy for `target = (class, *combo)`: factor groups A | B and other values A', B' such that (A, B'),
    (A', B), (A', B') are combinations their class was trained on; each as those three `(class, *combo)` terms. The
    digit (factor 0) is in A, or with `keep_digit` in no group (fixed in every term; then attribute 1 is in A)."""
    seen = {(cc, *x) for cc in range(len(tb.classes)) for x in tb.seen_combos[cc]}
    sizes = [len(tb.classes)] + [len(v) for v in grammar.ATTRIBUTES.values()]
    others = lambda i: [v for v in range(sizes[i]) if v != target[i]]  # noqa: E731
    attributes = range(1, len(target))
    found = []
    for r in range(1, len(target)):
        for b in itertools.combinations(attributes[1:] if keep_digit else attributes, r):
            a = ([] if keep_digit else [0]) + [i for i in attributes if i not in b]
            for alt_a in itertools.product(*map(others, a)):
                for alt_b in itertools.product(*map(others, b)):
                    terms = [_with(target, b, alt_b), _with(target, a, alt_a)]
                    terms.append(_with(terms[1], b, alt_b))
                    if all(t in seen for t in terms):
                        found.append(terms)
    return found


def partials(tb, prompt: str, neighbours: str = "drop", k: int = 1) -> tuple[list[str], list[float]] | None:
    """Captions and weights whose weighted predictions rebuild `prompt`'s, or None (fewer than 2 attributes).

    drop: [c_-1, ..., c_-n, d] with weights 1/(n-1), ..., -1/(n-1) (what `memctl.composed` ships).
    analogy: the caption's factors split in two groups A | B; with other values A', B' such that (A, B'), (A', B) and
    (A', B') were trained, `s(A, B) = s(A, B') + s(A', B) - s(A', B')` exactly if the groups' effects add (e.g.
    s(two, right, slowly) = s(two, right, fast) + s(six, down, slowly) - s(six, down, fast)). Every caption is a
    trained one, with every attribute named. "analogy" may swap the digit; "analogy-same" keeps it in every term and
    falls back to "drop" where no analogy exists. `k` analogies (drawn by a generator seeded with the caption) are
    averaged."""
    from memctl.zoo import attr, moving

    grammar = moving if is_video(tb.spec.get("name", "")) else attr
    try:
        c, combo = tb.combo_of(prompt)
    except ValueError:
        return None
    n = len(combo)
    if n < 2:
        return None
    if neighbours == "drop":
        drop = [tuple(i != j for i in range(n)) for j in range(n)]
        caps = [grammar.caption(c, combo, keep) for keep in drop] + [grammar.caption(c, combo, (False,) * n)]
        return caps, [1 / (n - 1)] * n + [-1 / (n - 1)]
    found = analogies(tb, grammar, (c, *combo), keep_digit=neighbours == "analogy-same")
    if not found:
        return partials(tb, prompt, "drop") if neighbours == "analogy-same" else None
    picked = random.Random(prompt).sample(found, min(k, len(found)))
    w = 1 / len(picked)
    return [grammar.caption(x[0], x[1:]) for terms in picked for x in terms], [w, w, -w] * len(picked)


class Composer:
    """Wraps the denoiser's forward: rows whose conditioning is a known full caption get the composed prediction."""

    def __init__(self, pipe, tb, prompts: list[str], neighbours: str = "drop", k: int = 1):
        self.denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        self.forward = self.denoiser.forward
        parts = {p: partials(tb, p, neighbours, k) for p in prompts}
        self.prompts = [p for p in prompts if parts[p] is not None]
        self.full = arriving(pipe, self.prompts)  # (P, L, D)
        self.parts = [arriving(pipe, parts[p][0]) for p in self.prompts]  # each (terms, L, D)
        self.weights = [torch.tensor(parts[p][1]) for p in self.prompts]
        self.f = 0.0
        self.window = (0.0, 1.0)  # composed only while timestep / 1000 lies in it

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
        level = float(torch.as_tensor(t).flatten()[0]) / 1000
        if not self.window[0] <= level <= self.window[1]:
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
            w = self.weights[idx[b]].to(chunk.dtype).view(-1, *[1] * (chunk.ndim - 1))
            composed = (w * chunk).sum(0)
            eps[b] = eps[b] + abs(self.f) * (composed - eps[b])
        if isinstance(out, tuple):
            return (eps, *out[1:])
        out.sample = eps
        return out


def run(name: str, fidelities: list[float], neighbours: str = "drop", k: int = 1, windows=((0.0, 1.0),)) -> dict:
    tb, pipe, spec = calibration_setup(name)
    t0 = time.perf_counter()
    plain = sample_testbed(pipe, tb, spec)
    rows = {"plain": headline(tb, score_samples(tb, plain, plain))}
    print(name, "plain", rows["plain"], flush=True)
    prompts = [c[0] for c in tb.canaries] + [p for p, _ in tb.eval_prompts()] + tb.unseen_prompts()
    with Composer(pipe, tb, prompts, neighbours, k) as comp:
        for f in fidelities:
            for window in windows:
                comp.f, comp.window = f, window
                key = f"compose {f:+.1f}" + ("" if window == (0.0, 1.0) else f" t in [{window[0]}, {window[1]}]")
                t1 = time.perf_counter()
                rows[key] = headline(tb, score_samples(tb, sample_testbed(pipe, tb, spec), plain))
                rows[key]["seconds"] = round(time.perf_counter() - t1, 1)
                print(name, key, rows[key], flush=True)
    return {"spec": spec.to_dict(), "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
            "composed_prompts": len(comp.prompts), "prompts": len(set(prompts))}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["digits-attr-s0", "moving-digits"])
    parser.add_argument("--fidelities", default="-1,-0.5")
    parser.add_argument("--out", default="compose_lever")
    parser.add_argument("--neighbours", choices=("drop", "analogy", "analogy-same"), default="drop")
    parser.add_argument("--k", type=int, default=1, help="analogies averaged per caption")
    parser.add_argument("--windows", default="0,1", help="timestep / 1000 windows lo,hi;lo,hi;...")
    a = parser.parse_args()
    fs = [float(x) for x in a.fidelities.split(",")]
    ws = [tuple(float(v) for v in w.split(",")) for w in a.windows.split(";")]
    results = {m: run(m, fs, a.neighbours, a.k, ws) for m in a.models}
    out = {"command": "python " + shlex.join(sys.argv), "results": results}
    with open(f"bench/results/{a.out}.json", "w") as fh:
        json.dump(out, fh, indent=1)
