"""Controls that isolate what a condition map's *selection* adds over its lever (`memctl bench effect`).

>>> from memctl.zoo import load_testbed
>>> tb = load_testbed("digits"); pipe = tb.pipeline(); bmap = tb.block_map()
>>> sorted(control_maps(pipe.unet, bmap, seeds=1))
['placement shuffled 0', 'random subspace 0', 'uniform']

- *uniform*: the learned subspace and bank, every cross-attention unit at the map's top score row;
- *text edit*: the same pull applied once, to the text states before the denoiser (`TextEdit`), with the top
  unit's factor at that fidelity: no unit is chosen at all;
- *placement shuffled*: the learned subspace kept, the scores permuted across units;
- *random subspace*: scores permuted and the subspace replaced by random directions (`BlockMap.shuffled`).

If the map does no better than *uniform* and *text edit* at the same copy rate, its placement is decorative.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from memctl.baselines.base import HOOK, InputsHook
from memctl.blockmap import BlockMap
from memctl.blocks import find_blocks, require_denoisers, unwrap
from memctl.hooks import PullCache, attached, cross_attentions
from memctl.knob import knob_law
from memctl.subspace import pull_with


def _cross_attention_rows(model: torch.nn.Module, bmap: BlockMap) -> list[int]:
    blocks = {b.name: b for b in find_blocks(model, names=bmap.names)}
    return [i for i, name in enumerate(bmap.names) if cross_attentions(model, blocks[name])]


def _top_row(bmap: BlockMap, rows: list[int]) -> torch.Tensor:
    return bmap.scores[rows][bmap.scores[rows].abs().amax(1).argmax()]


def with_scores(bmap: BlockMap, scores: torch.Tensor, control: dict) -> BlockMap:
    """The same map (lever tensors, meta, fingerprints) with other scores; `control` is recorded in meta."""
    return dataclasses.replace(bmap, scores=scores, meta={**bmap.meta, "control": control})


def uniform_map(model: torch.nn.Module, bmap: BlockMap) -> BlockMap:
    """Every cross-attention unit at the map's top score row (per noise level); other units untouched."""
    rows = _cross_attention_rows(unwrap(model), bmap)
    scores = bmap.scores.clone()
    scores[rows] = _top_row(bmap, rows)
    return with_scores(bmap, scores, {"kind": "uniform"})


def placement_shuffled(model: torch.nn.Module, bmap: BlockMap, seed: int) -> BlockMap:
    """The cross-attention units' score rows permuted among themselves (by `seed`); the subspace kept."""
    rows = _cross_attention_rows(unwrap(model), bmap)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    scores = bmap.scores.clone()
    scores[rows] = bmap.scores[[rows[i] for i in perm]]
    return with_scores(bmap, scores, {"kind": "placement shuffled", "seed": seed})


def control_maps(model: torch.nn.Module, bmap: BlockMap, seeds: int = 3) -> dict[str, BlockMap]:
    """The map-shaped controls of a condition map: uniform, and `seeds` each of placement shuffled, random subspace."""
    if bmap.lever != "condition":
        raise ValueError(f"Expected a condition-lever map, but got lever={bmap.lever!r}.")
    out = {"uniform": uniform_map(model, bmap)}
    out.update({f"placement shuffled {s}": placement_shuffled(model, bmap, s) for s in range(seeds)})
    out.update({f"random subspace {s}": bmap.shuffled(s) for s in range(seeds)})
    return out


class TextEdit:
    """The map's pull applied once to the denoiser's text states (no unit selected), at the factor the map's top
    cross-attention unit gets at `fidelity` and the current noise level. A pipeline with several denoisers (Wan
    2.2's experts) gets the edit on each, with that denoiser's own lever tensors and top unit."""

    def __init__(self, pipe_or_denoiser, bmap: BlockMap, fidelity: float):
        self.bmap, self.fidelity = bmap, float(fidelity)
        if isinstance(pipe_or_denoiser, torch.nn.Module):
            models = [(unwrap(pipe_or_denoiser), bmap)]
        else:
            found = require_denoisers(pipe_or_denoiser)
            mapped = [c for c in found if c in bmap.fingerprints]
            if len(bmap.fingerprints) > 1 and mapped:  # each denoiser its own part of the map
                models = [(unwrap(found[c]), bmap.select(c)) for c in mapped]
            else:
                from memctl.baselines.base import denoiser_of

                models = [(denoiser_of(pipe_or_denoiser), bmap)]
        sched = getattr(pipe_or_denoiser, "scheduler", None)
        t_scale = float(getattr(getattr(sched, "config", None), "num_train_timesteps", 1000))
        self.parts = [_EditPart(model, part, self.fidelity, t_scale) for model, part in models]
        self.model = self.parts[0].model

    @property
    def alpha(self) -> np.ndarray:
        """The first denoiser's pull factor per noise level (1 replaces memorized tokens, 0 leaves them)."""
        return self.parts[0].alpha

    @contextmanager
    def applied(self) -> Iterator[None]:
        with ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.applied())
            yield


class _EditPart:
    """`TextEdit` on one denoiser, with the lever tensors of its part of the map."""

    def __init__(self, model: torch.nn.Module, bmap: BlockMap, fidelity: float, t_scale: float):
        self.model, self.tensors, self.t_scale = model, bmap.lever_tensors, t_scale
        row = _top_row(bmap, _cross_attention_rows(model, bmap))
        scale = bmap.lever_config.knob_scale or float(bmap.scores.abs().max())
        floor = 1.0 - bmap.lever_config.pull_max
        self.alpha = (1 - knob_law(row, fidelity, 1.0, scale, floor)).numpy()  # (n_levels,)
        self.levels = bmap.levels.numpy() if bmap.levels is not None else np.zeros(1)
        self.cache = PullCache()  # the text states stay one tensor for every step of a call

    def _edit(self, hook, x, t, e):
        level = float(t.float().max() if isinstance(t, torch.Tensor) else t) / self.t_scale
        alpha = float(np.interp(level, self.levels, self.alpha))
        read, tau, bank = (self.tensors[k].to(e) for k in ("read", "tau", "bank"))
        return pull_with(e, *self.cache.parts(e, read, tau, bank), torch.tensor(alpha))

    @contextmanager
    def applied(self) -> Iterator[None]:
        project = getattr(getattr(self.model, "condition_embedder", None), "text_embedder", None)
        if project is None:  # UNets: the cross-attentions read the denoiser's text input itself
            with attached(self.model, {"": InputsHook(self._edit)}, HOOK):
                yield
            return
        # Wan: every attn2 reads the text projection's output, where the map's lever tensors live
        seen = {}

        def keep(hook, x, t, e):
            seen["t"] = t
            return e

        handle = project.register_forward_hook(lambda m, args, out: self._edit(None, None, seen["t"], out))
        try:
            with attached(self.model, {"": InputsHook(keep)}, HOOK):
                yield
        finally:
            handle.remove()
