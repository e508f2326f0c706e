"""The fidelity (+) gain of a condition map, calibrated per model from its probe set (no evaluation seeds).

Memorization guidance at fidelity f > 0 predicts `ε + γ f (ε − ε_pulled)` (`memctl.guidance`). On the probe batches
(noisy probe images at the probe noise levels, fixed probe noise) both ε and ε_pulled are known, and the denoising
error on the memorized probes is a quadratic in γ:

    ‖ε − n + γ (ε − ε_pulled)‖²  is smallest at  γ* = −⟨ε − n, ε − ε_pulled⟩ / ‖ε − ε_pulled‖²

for each memorized probe and level: the step toward what the memorized tokens add that best reproduces that
training image. Strongly memorized probes are already reproduced (their optimum is near 0); weakly memorized ones
want a larger step. γ is the `QUANTILE` (0.75) of these per-probe optima, so that the weakly memorized are helped and
a probe with optimum γ_k still gains for γ < 2 γ_k; then capped where the general probes' error rises by more than
`general_tolerance` (5 %), and clamped to [0, `max_gain`]. The rule was fixed before any evaluation-seed measurement
of it; it replaces the fixed γ = 0.5 chosen on the first models' evaluation seeds, which over-drove a model it was
not tuned on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from memctl.hooks import ConditionHook, attached, cross_attentions
from memctl.knob import knob_law

MAX_GAIN = 4.0
QUANTILE = 0.75
GENERAL_TOLERANCE = 0.05


@torch.no_grad()
def _predict(denoiser, b, chunk: int = 256) -> torch.Tensor:
    out = [denoiser(b.xt[i : i + chunk], b.t[i : i + chunk], encoder_hidden_states=b.cond[i : i + chunk]).sample
           for i in range(0, len(b.xt), chunk)]  # fmt: skip
    return torch.cat(out).float()


def _largest_within(a2: float, ad: float, d2: float, tolerance: float) -> float:
    """Largest γ ≥ 0 with a2 + 2γ ad + γ² d2 ≤ (1 + tolerance) a2."""
    if d2 <= 0:
        return math.inf
    # d2 γ² + 2 ad γ − tolerance a2 ≤ 0
    disc = ad * ad + d2 * tolerance * a2
    return (-ad + math.sqrt(max(disc, 0.0))) / d2


def contrasts(denoiser, blocks, tensors, scores, batches, knob_scale: float) -> Iterator[tuple[Tensor, Tensor, int]]:
    """Per probe batch (one per noise level, memorized rows first), in turn: `(a, d, n_mem)` with `a = ε − n` and
    `d = ε − ε_pulled` flattened per probe, `ε_pulled` under the pull that guidance contrasts with (no overshoot)."""
    units = [(i, paths) for i, b in enumerate(blocks) if (paths := cross_attentions(denoiser, b))]
    for j, b in enumerate(batches):
        pull = knob_law(scores[:, j], -1.0, 1.0, knob_scale, 0.0)
        eps = _predict(denoiser, b)
        hooks = {}
        for i, paths in units:
            for p in paths:
                hooks[p] = ConditionHook("memctl.calibrate", tensors, float(pull[i]))
        with attached(denoiser, hooks, "memctl.calibrate"):
            pulled = _predict(denoiser, b)
        yield (eps - b.noise.float()).flatten(1), (eps - pulled).flatten(1), b.n_mem


def fidelity_gain(
    denoiser, blocks, tensors, scores, batches, knob_scale: float, max_gain: float = MAX_GAIN,
    general_tolerance: float = GENERAL_TOLERANCE,
) -> tuple[float, dict]:  # fmt: skip
    """γ for `meta["fidelity_guidance"]`, and the sums it came from. `batches` are `memctl.probe`'s probe batches
    (memorized rows first), one per noise level, matching the columns of `scores`."""
    gen = [0.0, 0.0, 0.0]  # general probes: ‖a‖², ⟨a, d⟩, ‖d‖²
    optima = []  # per memorized probe and level
    for a, d, m in contrasts(denoiser, blocks, tensors, scores, batches, knob_scale):
        d2 = d[:m].pow(2).sum(1)
        moved = d2 > 1e-12  # probes whose prediction the pull changes at all
        optima.append(-(a[:m] * d[:m]).sum(1)[moved] / d2[moved])
        gen[0] += a[m:].pow(2).sum().item()
        gen[1] += (a[m:] * d[m:]).sum().item()
        gen[2] += d[m:].pow(2).sum().item()
    optima = torch.cat(optima)
    best = float(optima.quantile(QUANTILE)) if len(optima) else 0.0
    cap = _largest_within(*gen, general_tolerance)
    gain = float(min(max(best, 0.0), cap, max_gain))
    info = {"rule": f"quantile {QUANTILE} of per-probe optima", "memorized_optimum": round(best, 4),
            "general_cap": round(cap, 4) if math.isfinite(cap) else None,
            "gain": round(gain, 4), "max_gain": max_gain, "general_tolerance": general_tolerance}  # fmt: skip
    return round(gain, 4), info
