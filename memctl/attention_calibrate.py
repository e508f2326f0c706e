"""The in-attention guidance gain of a condition map, calibrated from its probe set (no evaluation seeds).

    >>> import memctl
    >>> tb = memctl.zoo.load_testbed("digits")
    >>> probes = memctl.ProbeSet(memorized=[(p, im) for p, im, _, _ in tb.canaries[:4]],
    ...                          general=[(tb.prompt(int(c)), im) for im, c in zip(*tb.held_out)][:8])
    >>> amap = attention_map(tb.pipeline(), tb.block_map(), probes)   # a copy that guides inside the units
    >>> amap.meta["fidelity_mode"], 0.0 <= amap.meta["attention_guidance"] <= max(GRID)
    ('attention', True)

The rule of `memctl.calibrate` (fixed there before any evaluation of it), carried over to a lever whose output is not
linear in γ: on the probe batches (noisy probe images at the probe noise levels, the probe seed's noise) the
denoising error of each memorized probe is measured at every γ of `GRID` with the knob at fidelity 1 in attention
mode; each probe's optimum is the γ of least error (probes the guidance does not move are left out); γ is the
`QUANTILE` of these optima, then lowered to the largest grid value at which the general probes' error rises by at
most `GENERAL_TOLERANCE`, and clamped to [0, max(GRID)].
"""

from __future__ import annotations

import dataclasses

import torch

from memctl.calibrate import GENERAL_TOLERANCE, QUANTILE
from memctl.knob import apply_knob, remove_knob, set_fidelity

__all__ = ["GRID", "attention_gain", "attention_map"]

GRID = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


@torch.no_grad()
def _errors(denoiser, b, chunk: int = 256) -> torch.Tensor:
    """Per-row squared ε error `(N,)` of one probe batch."""
    out = []
    for i in range(0, len(b.xt), chunk):
        s = slice(i, i + chunk)
        eps = denoiser(b.xt[s], b.t[s], encoder_hidden_states=b.cond[s]).sample
        out.append((eps.float() - b.noise[s].float()).pow(2).flatten(1).sum(1))
    return torch.cat(out)


def attention_gain(pipe, bmap, probes, seed: int | None = None, repeats: int = 2) -> tuple[float, dict]:
    """γ for `meta["attention_guidance"]` and what it came from (see the module docstring)."""
    from memctl.probe import _denoiser, _make_batches

    levels = bmap.levels.tolist() if bmap.levels is not None else [0.5]
    batches = _make_batches(pipe, probes, levels, bmap.meta.get("seed", 0) if seed is None else seed, repeats)
    denoiser, top = _denoiser(pipe), max(GRID)
    scaled = dataclasses.replace(bmap, meta={**bmap.meta, "attention_guidance": top, "fidelity_mode": "attention"})
    mem, gen = [], []  # per grid value: errors of memorized rows, sum over general rows
    apply_knob(pipe, scaled)
    try:
        for g in GRID:
            set_fidelity(pipe, g / top)
            errs = [_errors(denoiser, b) for b in batches]
            mem.append(torch.cat([e[: b.n_mem] for e, b in zip(errs, batches, strict=True)]))
            gen.append(sum(float(e[b.n_mem :].sum()) for e, b in zip(errs, batches, strict=True)))
    finally:
        remove_knob(pipe)
    curves = torch.stack(mem, 1)  # (memorized rows × levels, len(GRID))
    moved = (curves[:, 1:] - curves[:, :1]).abs().amax(1) > 0  # probes whose prediction the guidance changes
    optima = torch.tensor(GRID)[curves[moved].argmin(1)]
    best = float(optima.quantile(QUANTILE)) if len(optima) else 0.0
    cap = 0.0
    for g, e in zip(GRID, gen, strict=True):  # up to the first grid value past the general tolerance
        if e > (1 + GENERAL_TOLERANCE) * gen[0]:
            break
        cap = g
    gain = min(best, cap)
    info = {"rule": f"quantile {QUANTILE} of per-probe optima on the grid {list(GRID)}",
            "memorized_optimum": best, "general_cap": cap, "gain": gain, "general_tolerance": GENERAL_TOLERANCE,
            "general_error_ratio": [round(e / gen[0], 4) for e in gen]}  # fmt: skip
    return gain, info


def attention_map(pipe, bmap, probes, seed: int | None = None):
    """A copy of condition map `bmap` whose fidelity > 0 guides inside the units, with γ calibrated on `probes`."""
    if bmap.lever != "condition":
        raise ValueError(f"Expected a condition-lever map for in-attention guidance, but got lever={bmap.lever!r}.")
    gain, info = attention_gain(pipe, bmap, probes, seed)
    meta = {**bmap.meta, "fidelity_mode": "attention", "attention_guidance": gain, "attention_calibration": info}
    return dataclasses.replace(bmap, meta=meta)
