"""In-attention memorization guidance: the fidelity > 0 side of the condition lever without a second denoiser pass.

    >>> apply_knob(pipe, bmap, fidelity_mode="attention")   # or bmap.meta["fidelity_mode"] = "attention"
    >>> set_fidelity(pipe, 1.0)   # each selected cross-attention also attends to the pulled conditioning
    >>> remove_knob(pipe)

The extra-pass guidance (`memctl.guidance`) runs the whole denoiser again with the memorized tokens pulled and
returns `out + γ f (out - pulled)`. Here the same contrast is made inside every cross-attention unit the knob hooks:
the unit's output becomes `a(e) + γ f (a(e) - a(e'))`, where `a` is the attention unit, `e` the conditioning the
unit reads now and `e'` the same conditioning with the memorized tokens pulled by the factor the knob would use at
fidelity -1 (`_KnobState.pull`, pull 1 at most: no overshoot). The attention call is made once, on a batch of two:
the conditioning `[e; e']` gives two keys and values (the extra K/V projection of 77 tokens); the query projection
of the image tokens is computed once and repeated (`to_q`'s hook); the two attention outputs are combined before the
output projection (`to_out.0`'s hook), which is linear, so it runs once too. The keys and values of `[e; e']` are
not projected at every step either (`to_k`'s and `to_v`'s hooks, where they are `nn.Linear`): both halves are
`e + a Δ` with `Δ = w (g - e)` fixed for the conditioning and only the factor `a` changing with the step, so
`W(e + a Δ) + b = (W e + b) + a W Δ` is built from two projections made when the conditioning is first seen
(`memctl.hooks.PullCache` says when it is the same) and reused at every step. The extra cost per unit and step is
then one attention over the conditioning's tokens and a few scaled additions; the guided unit projects its
conditioning less often than the plain one. The projections so built equal projecting `[e; e']` up to rounding;
while `torch.compile` traces, and for other projection modules (a LoRA layer), the layer projects `[e; e']` itself.
Memory: per hooked unit, for each of `to_k` and `to_v`, two `(B, L, C)` tensors for each of the last two
conditionings (Wan 1.3B, 30 units, 512 tokens, bf16: at most 0.4 GB); freed when the knob is removed.

This relies on the processor reading the batch size from the conditioning and calling `to_q`, `to_k`, `to_v`,
`to_out[0]` once each, as diffusers' `AttnProcessor2_0` and `AttnProcessor` do; other processors are refused at
install with an error naming the extra-pass mode. At fidelity <= 0 the switch is off and the hooks are exactly the
condition lever's (bit-identical outputs). The switch is one Python bool that changes only when fidelity crosses 0,
so a compiled denoiser has at most two graphs. γ is `meta["attention_guidance"]` (calibrated on the probe set by
`memctl.attention_calibrate`), else `meta["fidelity_guidance"]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.hooks import ModelHook

from memctl.hooks import ConditionHook, PullCache, recent, tensor_key, unkeyable

__all__ = ["FIDELITY_MODES", "SUPPORTED_PROCESSORS", "AttentionGuide", "AttentionGuidanceHook", "check_processor"]

FIDELITY_MODES = ("guidance", "cached", "attention")  # extra pass every step | every 10th (memctl.guidance) | inside
DEFAULT_FIDELITY_MODE = "cached"  # chosen on digits-s0 / digits-attr-s0 at probe-side seeds (memctl.guidance)
# processors that call to_q, to_k, to_v (or Wan's fused to_kv) and to_out[0] once each and take the batch size from
# the conditioning (diffusers' Attention) or from the query (WanAttention)
SUPPORTED_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "WanAttnProcessor", "WanAttnProcessor2_0")


def check_processor(attention: torch.nn.Module) -> None:
    """A clear error, before anything is hooked, for an attention processor this mode cannot work with."""
    processor = type(getattr(attention, "processor", None)).__name__
    if processor not in SUPPORTED_PROCESSORS:
        raise ValueError(
            f"Expected a cross-attention processor in {SUPPORTED_PROCESSORS} for fidelity_mode='attention', but "
            f"got {processor}. Use fidelity_mode='guidance' (one extra denoiser pass) for this model."
        )


class AttentionGuide:
    """The knob's switch for in-attention guidance (plays the part of `GuidanceHook` in `_KnobState.guide`)."""

    def __init__(self, groups: list[list[Any]]):
        self.groups = groups  # the knob's groups of hooks, one group per block of the map
        self.on = False

    def hooks(self) -> list[AttentionGuidanceHook]:
        return [h for group in self.groups for h in group if isinstance(h, AttentionGuidanceHook)]

    def set_weight(self, weight: float) -> None:
        """γ f for every unit; guidance runs while it is > 0."""
        for h in self.hooks():
            h.weight.fill_(weight)
        self.on = weight > 0

    def set_pull(self, pull: torch.Tensor) -> None:
        """The factors `(n_groups,)` of the pulled conditioning for this denoiser call (the clock's)."""
        for i, group in enumerate(self.groups):
            for h in group:
                if isinstance(h, AttentionGuidanceHook):
                    h.pull.copy_(pull[i])


class _Twice(ModelHook):
    """On `to_q`: the query of one batch, repeated for the two conditionings (no second projection)."""

    def __init__(self, owner: AttentionGuidanceHook):
        super().__init__()
        self.owner = owner

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        return torch.cat([output, output]) if self.owner.active else output


class _Combine(ModelHook):
    """On `to_out.0`: `a + w (a - a')` from the two halves of the batch, before the (linear) output projection."""

    def __init__(self, owner: AttentionGuidanceHook):
        super().__init__()
        self.owner = owner

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if not self.owner.active:
            return args, kwargs
        self.owner.active, self.owner.request = False, None
        a, pulled = args[0].chunk(2)  # (B, N, C) each
        w = self.owner.weight
        return (a + w.to(a.dtype) * (a - pulled), *args[1:]), kwargs


class _Project(ModelHook):
    """On `to_k` / `to_v`: their output for `[e; e']` from `W e + b` and `W Δ`, made once per conditioning.

    The layer itself then runs on zero tokens (nothing to compute) and its output is replaced after; it runs as usual
    when the owner is not guiding, while compiling, and for modules that are not `nn.Linear`.
    """

    def __init__(self, owner: AttentionGuidanceHook, size: int = 2):  # cond and uncond (Wan: two calls a step)
        super().__init__()
        self.owner, self.size = owner, int(size)
        self.entries = {}  # (id of the PullCache's w, weight key, bias key) -> (w kept alive, W e + b, W Δ)
        self.out = None

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.out, request = None, self.owner.request
        if request is None or not isinstance(module, torch.nn.Linear) or len(args) != 1 or kwargs:
            return args, kwargs
        e, w, g, a_now, a_pulled = request
        if args[0].shape != (2 * e.shape[0], *e.shape[1:]):  # the layer reads something else than [e; e']
            return args, kwargs
        params = [t for t in (module.weight, module.bias) if t is not None]
        if unkeyable(args[0], *params):
            return args, kwargs
        key = (id(w), *(tensor_key(t) for t in params))

        def make():
            delta = w[..., None].to(e.dtype) * (g - e)
            return (
                w,
                torch.nn.functional.linear(e, module.weight, module.bias),
                torch.nn.functional.linear(delta, module.weight),
            )

        _, base, step = recent(self.entries, key, make, self.size)
        self.out = torch.cat([base + a_now.to(base.dtype) * step, base + a_pulled.to(base.dtype) * step])
        return (args[0][..., :0, :],), kwargs  # no tokens: the layer computes nothing

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        out, self.out = self.out, None
        return output if out is None else out

    def clear(self) -> None:
        self.entries.clear()


class AttentionGuidanceHook(ConditionHook):
    """The condition lever's hook on one cross-attention `Attention`, plus in-attention guidance while `guide.on`.

    Buffers on the module besides the lever's: `weight` (γ f, 0-d) and `pull` (the factor of the pulled
    conditioning, 0-d). `subhooks(path, module)` gives the hooks for its projections, attached with it.
    """

    def __init__(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        value: float = 1.0,
        cache: PullCache | None = None,
        guide: AttentionGuide | None = None,
    ):
        super().__init__(name, tensors, value, cache)
        self.guide = guide
        self.active = False  # this call attends to [e; e'] (set in pre_forward, cleared by the output hook)
        self.request = None  # (e, w, g, a now, a pulled) for the K/V hooks while active and not compiling
        self._projections: list[_Project] = []

    def subhooks(self, path: str, module: torch.nn.Module) -> dict[str, ModelHook]:
        """The hooks of the unit `module` at `path`: `to_q` and `to_out.0`, and `to_k` / `to_v` where it has them and
        projects the conditioning as it comes (no `norm_cross` before the projections)."""
        hooks = {f"{path}.to_q": _Twice(self), f"{path}.to_out.0": _Combine(self)}
        for name in () if getattr(module, "norm_cross", None) else ("to_k", "to_v"):
            if isinstance(getattr(module, name, None), torch.nn.Module):
                hooks[f"{path}.{name}"] = _Project(self)
                self._projections.append(hooks[f"{path}.{name}"])
        return hooks

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        check_processor(module)
        super().initialize_hook(module)
        device = self.scale.device
        module.register_buffer(self.buffer + "_weight", torch.tensor(0.0, device=device), persistent=False)
        module.register_buffer(self.buffer + "_pull", torch.tensor(1.0, device=device), persistent=False)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' spelling)
        module._buffers.pop(self.buffer + "_weight", None)
        module._buffers.pop(self.buffer + "_pull", None)
        for p in self._projections:
            p.clear()
        return super().deinitalize_hook(module)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._module, self.buffer + "_weight")

    @property
    def pull(self) -> torch.Tensor:
        return getattr(self._module, self.buffer + "_pull")

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        from memctl.subspace import pull_with

        self.active, self.request = False, None
        e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if self.guide is None or not self.guide.on or e is None:
            return super().pre_forward(module, *args, **kwargs)
        read, tau, bank = (getattr(module, f"{self.buffer}_{k}") for k in self._TENSORS)
        w, g = self.cache.parts(e, read, tau, bank)
        a_now, a_pulled = 1 - self.scale, 1 - self.pull
        now = pull_with(e, w, g, a_now)  # what the lever gives this call (identity at fidelity > 0)
        both = torch.cat([now, pull_with(e, w, g, a_pulled)])  # (2B, L, D): [e; e']
        if self._projections and not unkeyable(e, w, g):
            self.request = (e, w, g, a_now, a_pulled)  # the K/V hooks build their outputs from per-conditioning parts
        if "encoder_hidden_states" in kwargs or len(args) < 2:
            kwargs["encoder_hidden_states"] = both
        else:
            args = (args[0], both, *args[2:])
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask, mask])
        self.active = True
        return args, kwargs
