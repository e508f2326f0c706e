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
output projection (`to_out.0`'s hook), which is linear, so it runs once too. The extra cost per unit is one K/V
projection of the conditioning and one attention over its tokens: no other layer runs twice.

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

from memctl.hooks import ConditionHook, PullCache

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
        self.owner.active = False
        a, pulled = args[0].chunk(2)  # (B, N, C) each
        w = self.owner.weight
        return (a + w.to(a.dtype) * (a - pulled), *args[1:]), kwargs


class AttentionGuidanceHook(ConditionHook):
    """The condition lever's hook on one cross-attention `Attention`, plus in-attention guidance while `guide.on`.

    Buffers on the module besides the lever's: `weight` (γ f, 0-d) and `pull` (the factor of the pulled
    conditioning, 0-d). `subhooks(path)` gives the hooks for its `to_q` and `to_out.0`, attached with it.
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

    def subhooks(self, path: str) -> dict[str, ModelHook]:
        return {f"{path}.to_q": _Twice(self), f"{path}.to_out.0": _Combine(self)}

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
        return super().deinitalize_hook(module)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._module, self.buffer + "_weight")

    @property
    def pull(self) -> torch.Tensor:
        return getattr(self._module, self.buffer + "_pull")

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        from memctl.subspace import pull_with

        self.active = False
        e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if self.guide is None or not self.guide.on or e is None:
            return super().pre_forward(module, *args, **kwargs)
        read, tau, bank = (getattr(module, f"{self.buffer}_{k}") for k in self._TENSORS)
        w, g = self.cache.parts(e, read, tau, bank)
        now = pull_with(e, w, g, 1 - self.scale)  # what the lever gives this call (identity at fidelity > 0)
        both = torch.cat([now, pull_with(e, w, g, 1 - self.pull)])  # (2B, L, D): [e; e']
        if "encoder_hidden_states" in kwargs or len(args) < 2:
            kwargs["encoder_hidden_states"] = both
        else:
            args = (args[0], both, *args[2:])
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask, mask])
        self.active = True
        return args, kwargs
