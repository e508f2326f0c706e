"""The conditioning lever: find the directions of text-state space that memorized prompts use and general prompts
don't, weigh each token by its energy along them, and pull heavy tokens toward the nearest general conditioning.

>>> g = torch.Generator().manual_seed(0)
>>> general = torch.randn(30, 6, 8, generator=g)                     # 30 general prompts × 6 tokens × width 8
>>> memorized = general[:5].clone(); memorized[:, 3:, 2] += 8.0       # tokens 3+ carry a memorized tag
>>> sub = fit_subspace(memorized, general, k=2)
>>> tau = weight_threshold(general, sub.read)
>>> w = memorization_weight(memorized, sub.read, tau)
>>> bool(w[:, 3:].min() > 0.75 and w[:, :3].max() < 0.5)
True
>>> pulled = pull_to_general(memorized, sub.read, tau, general, torch.tensor(1.0))
>>> bool((pulled[:, 3:, 2] - general[:5, 3:, 2]).abs().mean() < 2.0)  # most of the +8 tag is gone
True
>>> torch.equal(pull_to_general(memorized, sub.read, tau, general, torch.tensor(0.0)), memorized)
True

Directions: in coordinates whitened by the general states' second moment G, the top-k eigenvectors V of the
memorized second moment (a generalized eigenproblem; eigenvalues = how many times more energy memorized tokens put
there). `read = G^{-1/2} V` gives a token's coordinates along them. The pull `e + α w (g - e)` replaces (α = 1)
memorized tokens by those of the closest general prompt `g`, keeps everything at α = 0 (bit for bit), and pushes
away from `g` at α < 0. Related: closed-form concept erasure in cross-attention (Gandikota et al. 2024, UCE) and
memorized-token attribution by cross-attention (Ren et al. 2024), with the concept found from probes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Subspace:
    read: torch.Tensor  # (D, k)
    ratios: torch.Tensor  # (k,) memorized / general energy along each direction
    g_inv_half: torch.Tensor  # (D, D) whitening of the general states (for random controls in the same space)


def _second_moment(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / len(x)


def fit_subspace(memorized: torch.Tensor, general: torch.Tensor, k: int = 8, ridge: float = 1e-3) -> Subspace:
    """Top-`k` generalized eigendirections of (memorized, general) token second moments; inputs `(..., D)`."""
    if memorized.shape[-1] != general.shape[-1]:
        raise ValueError(f"Expected states of one width, but got {memorized.shape[-1]} and {general.shape[-1]}.")
    d = memorized.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"Expected 1 <= k <= {d}, but got k={k}.")
    g = _second_moment(general)
    g = g + ridge * g.diagonal().mean() * torch.eye(d, dtype=g.dtype)
    ev, evec = torch.linalg.eigh(g)
    g_inv_half = evec @ torch.diag(ev.rsqrt()) @ evec.T
    lam, v = torch.linalg.eigh(g_inv_half @ _second_moment(memorized) @ g_inv_half)
    top = lam.argsort(descending=True)[:k]
    return Subspace((g_inv_half @ v[:, top]).float(), lam[top].float(), g_inv_half.float())


def weight_threshold(general: torch.Tensor, read: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """`tau`: the `q`-quantile of general tokens' energy along `read` (such a token gets weight 1/2)."""
    energy = (general.reshape(-1, general.shape[-1]).double() @ read.double()).pow(2).sum(-1)
    return energy.float().quantile(q)


def memorization_weight(states: torch.Tensor, read: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Per-token weight in [0, 1): energy along the memorized directions, `en / (en + tau)`; `(B, L, D) → (B, L)`."""
    energy = (states @ read.to(states.dtype)).pow(2).sum(-1)
    return energy / (energy + torch.as_tensor(tau, dtype=states.dtype, device=states.device))


def nearest_general(states: torch.Tensor, bank: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """For each sequence, the general conditioning in `bank` `(P, L, D)` closest on its non-memorized tokens.

    A bank of another length `L` than the states' is cut, or extended with its last token: T5-encoded prompts (Wan)
    are zero-padded to the call's `max_sequence_length`, so their tail tokens are all the same padding state."""
    bank = fit_length(bank.to(states.dtype), states.shape[1])
    d = ((states[:, None] - bank[None]).pow(2).sum(-1) * (1 - weight)[:, None]).sum(-1)  # (B, P)
    return bank[d.argmin(1)]  # (B, L, D)


def fit_length(states: torch.Tensor, length: int) -> torch.Tensor:
    """`states` `(N, L, D)` at `length` tokens: cut, or extended with each sequence's last token (the padding state
    of T5-encoded prompts, which Wan zero-pads to the call's `max_sequence_length`)."""
    extra = length - states.shape[1]
    if extra <= 0:
        return states[:, :length]
    return torch.cat([states, states[:, -1:].expand(-1, extra, -1)], 1)


def trim_bank(bank: torch.Tensor) -> torch.Tensor:
    """`bank` `(P, L, D)` cut after the first token from which every prompt's tail repeats its own last state, with
    one such token kept: `nearest_general` extends it back to any length exactly. T5-encoded prompts (Wan) are
    zero-padded to 512 tokens, so a bank of 61 prompts shrinks from 512 tokens to the longest prompt's + 1; banks
    without a constant tail (CLIP: padding states differ) are returned as they are.

    >>> bank = torch.cat([torch.randn(3, 4, 2), torch.ones(3, 6, 2)], 1)
    >>> tuple(trim_bank(bank).shape), torch.equal(nearest_general(bank, trim_bank(bank), torch.zeros(3, 10)), bank)
    ((3, 5, 2), True)
    """
    same = (bank == bank[:, -1:]).all(-1).all(0)  # (L,): token equals the last one in every prompt
    keep = len(same)
    while keep > 1 and same[keep - 2]:
        keep -= 1
    return bank[:, :keep].contiguous()


def pull_parts(states, read, tau, bank) -> tuple[torch.Tensor, torch.Tensor]:
    """The α-independent parts of the pull: token weights `w` `(B, L)` and nearest general conditioning `g`."""
    w = memorization_weight(states, read, tau)
    return w, nearest_general(states, bank, w)


def pull_with(states: torch.Tensor, w: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """`e + α w (g - e)` from parts made by `pull_parts` (the same operations as `pull_to_general`, bit for bit)."""
    return states + (alpha.to(states.dtype) * w)[..., None] * (g - states)


def pull_norm(states: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per sequence, the size `‖w (g - e)‖` `(B,)` of its full pull (α = 1), from parts made by `pull_parts`."""
    return (w[..., None] * (g - states)).flatten(1).float().norm(dim=1)


def pull_to_general(states, read, tau, bank, alpha: torch.Tensor) -> torch.Tensor:
    """`e + α w (g - e)` for `states` `(B, L, D)`: α = 1 replaces memorized tokens, 0 is exact, < 0 pushes away."""
    w, g = pull_parts(states, read, tau, bank)
    return pull_with(states, w, g, alpha)
