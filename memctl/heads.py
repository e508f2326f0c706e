"""The condition lever at the granularity of cross-attention *heads* (a localization experiment).

A unit-level condition map pulls memorized text tokens in every head of a chosen cross-attention. Here each head of
each cross-attention is scored on its own: the pull is applied to the keys and values of one head at a time (through
hooks on `to_k` / `to_v`: `out + α_c (W ẽ − W e)`, α per output channel, grouped by head), and the head is scored by
the same selectivity as units (`memctl.probe._selectivity`: memorized probes' loss rise minus general probes' rise,
in units of the general loss). At fidelity f < 0 head h is pulled by α_h = 1 − knob_law(score_h, f, floor=1 −
pull_max), the unit knob's law.

>>> from memctl.zoo import load_testbed
>>> tb = load_testbed("digits"); pipe = tb.pipeline(); bmap = tb.block_map()
>>> heads = cross_attention_heads(pipe.unet)
>>> len(heads) == 6 * 4  # six cross-attentions of four heads
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from memctl.hooks import PullCache, attached
from memctl.knob import knob_law
from memctl.subspace import pull_with

HOOK = "memctl.heads"


def cross_attention_heads(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(cross-attention path, head index, number of heads) for every head of every cross-attention."""
    return [
        (name, h, m.heads)
        for name, m in model.named_modules()
        if getattr(m, "is_cross_attention", False) and hasattr(m, "to_k")
        for h in range(m.heads)
    ]


class _KVPull(ModelHook):
    """On `to_k` / `to_v`: `out + α (W pulled(e) − W e)` with α `(out_features,)` (a buffer others fill)."""

    def __init__(self, tensors: dict, alpha: torch.Tensor, cache: PullCache):
        super().__init__()
        self.tensors, self.alpha, self.cache, self._e = tensors, alpha, cache, None

    def pre_forward(self, module, *args, **kwargs):
        self._e = args[0] if args else kwargs["input"]
        return args, kwargs

    def post_forward(self, module, output):
        if not bool(self.alpha.any()):
            return output
        e = self._e
        read, tau, bank = (self.tensors[k].to(e) for k in ("read", "tau", "bank"))
        pulled = pull_with(e, *self.cache.parts(e, read, tau, bank), torch.tensor(1.0))
        return output + self.alpha.to(output) * (F.linear(pulled, module.weight, module.bias) - output)


class HeadLever:
    """Per-head pull factors on a denoiser: `set(alphas)` with one α per head of `cross_attention_heads`."""

    def __init__(self, model: torch.nn.Module, tensors: dict):
        self.model, self.tensors = model, tensors
        self.heads = cross_attention_heads(model)
        self.alphas: dict[str, torch.Tensor] = {}
        for path in dict.fromkeys(p for p, _, _ in self.heads):
            attn = model.get_submodule(path)
            self.alphas[path] = torch.zeros(attn.to_k.out_features)

    def set(self, alphas) -> None:
        for path in self.alphas:
            self.alphas[path].zero_()
        for (path, h, n), a in zip(self.heads, alphas, strict=True):
            width = self.alphas[path].shape[0] // n
            self.alphas[path][h * width : (h + 1) * width] = float(a)

    @contextmanager
    def applied(self) -> Iterator[HeadLever]:
        hooks, cache = {}, PullCache()  # one pull per conditioning for every head, step and projection
        for path, alpha in self.alphas.items():
            hooks[f"{path}.to_k"] = _KVPull(self.tensors, alpha, cache)
            hooks[f"{path}.to_v"] = _KVPull(self.tensors, alpha, cache)
        with attached(self.model, hooks, HOOK):
            yield self


def head_scores(pipe, probes, tensors, levels, seed: int = 0, repeats: int = 2) -> torch.Tensor:
    """`(n_heads, n_levels)` selectivity of pulling memorized tokens in one head at a time."""
    from memctl.probe import _denoiser, _losses, _make_batches, _selectivity

    model = _denoiser(pipe)
    batches = _make_batches(pipe, probes, levels, seed, repeats)
    base = [_losses(model, b) for b in batches]
    lever = HeadLever(model, tensors)
    scores = torch.zeros(len(lever.heads), len(levels))
    with lever.applied():
        for i in range(len(lever.heads)):
            lever.set([1.0 if j == i else 0.0 for j in range(len(lever.heads))])
            scores[i] = torch.tensor([_selectivity(base[j], _losses(model, b)) for j, b in enumerate(batches)])
    return scores


class HeadKnob:
    """The head map at a fixed fidelity f < 0: α_h(t) from the knob law, interpolated over the probe levels, set
    by a pre-forward hook on the denoiser from its timestep."""

    def __init__(self, pipe, tensors, scores: torch.Tensor, levels, fidelity: float, pull_max: float = 2.0):
        from memctl.probe import _denoiser, _knob_scale

        self.model = _denoiser(pipe)
        self.lever = HeadLever(self.model, tensors)
        scale = _knob_scale(scores)
        self.alpha = (1 - knob_law(scores, fidelity, 1.0, scale, 1.0 - pull_max)).numpy()  # (n_heads, n_levels)
        self.levels = np.asarray(levels, dtype=float)
        self.t_scale = float(pipe.scheduler.config.num_train_timesteps)

    def _on_call(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        level = float(torch.as_tensor(t).float().max()) / self.t_scale
        self.lever.set([float(np.interp(level, self.levels, row)) for row in self.alpha])

    @contextmanager
    def applied(self) -> Iterator[None]:
        handle = self.model.register_forward_pre_hook(self._on_call, with_kwargs=True)
        try:
            with self.lever.applied():
                yield
        finally:
            handle.remove()
