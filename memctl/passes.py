"""Conditional pass only: the knob scales the conditional prediction and leaves the unconditional one untouched.

    >>> apply_knob(pipe, bmap, passes="cond")  # guided sampling: only the text-conditional pass is steered
    >>> with fidelity(pipe, -0.5):
    ...     images = pipe("ab", guidance_scale=5.0, num_inference_steps=2, height=8, width=8).images
    >>> remove_knob(pipe)

Pipelines run the two passes of classifier-free guidance in one of two ways, and each denoiser call is read as such:

- **two calls** (Flux true CFG, Wan): the pipeline wraps each in `denoiser.cache_context("cond" | "uncond")`.
  `PassHook` is a stateful diffusers hook, so diffusers hands it that context; an "uncond" call is left untouched
  and a "cond" call is scaled whole.
- **one batch** (SD, SDXL, SD3, AnimateDiff, CogVideoX's "cond_uncond", PixArt): the latents are repeated,
  `torch.cat([latents] * 2)`, with the unconditional chunk first. A call whose batch splits into identical chunks
  is such a batch, and its first chunk is left untouched; any other call (no guidance, SD3's skip-layer pass) is
  conditional and scaled whole. PAG pipelines add a perturbed chunk, `[uncond, cond, perturbed]`: their
  `do_classifier_free_guidance` / `do_perturbed_attention_guidance` say how many chunks there are. DiT puts the
  null class last: rows whose `class_labels` are the null class are left untouched.

The rows to leave untouched go to every knob hook as a `(3,)` buffer `(k, a, b)`: row `r` of a block's output with
`n` rows is untouched when `a <= r * k // n < b`. Blocks that fold frames or pixels into the batch (AnimateDiff's
motion modules, video UNets) keep it batch-major, so the same chunks hold. Everything is tensor arithmetic on
in-place buffers: no Python branch on data, so `torch.compile(fullgraph=True)` traces it and changing fidelity
does not recompile. Untouched rows get the factor 1.0 exactly, so they equal the plain model bit for bit.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager

from memctl.hooks import ResidualScaleHook

__all__ = ["PASSES", "PASS_MODES", "CondRowsHook", "PassHook", "CondRows"]

PASSES = "memctl.knob.passes"  # root hook reading which pass a denoiser call is
PASS_MODES = ("both", "cond")
_NONE, _ALL = (1, 0, 0), (1, 0, 1)  # (k, a, b): no row untouched / every row untouched


def _row_factor(s: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row factor for `x` (n, ...): 1.0 on the untouched rows `rows` = (k, a, b) describes, `s` elsewhere."""
    n = x.shape[0]
    chunk = torch.arange(n, device=x.device) * rows[0] // n  # (n,) chunk index of each row
    keep = (chunk >= rows[1]) & (chunk < rows[2])
    return torch.where(keep, torch.ones_like(s), s).to(x.dtype).reshape(n, *([1] * (x.ndim - 1)))


class CondRowsHook(ResidualScaleHook):
    """`ResidualScaleHook` that leaves the rows of the unconditional pass at factor 1 (a `(3,)` buffer, see above)."""

    def __init__(self, block, name: str, value: float = 1.0):
        super().__init__(block, name, value)
        self.rows_buffer = self.buffer + "_rows"

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        super().initialize_hook(module)
        device = getattr(module, self.buffer).device
        module.register_buffer(self.rows_buffer, torch.tensor(_NONE, device=device), persistent=False)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' spelling)
        module._buffers.pop(self.rows_buffer, None)
        return super().deinitalize_hook(module)

    @property
    def rows(self) -> torch.Tensor:
        """The live `(k, a, b)` of the untouched rows; change it in place."""
        return getattr(self._module, self.rows_buffer)

    def factor(self, module: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
        return _row_factor(getattr(module, self.buffer), getattr(module, self.rows_buffer), out)


class _ContextName(StateManager):
    """Receives diffusers' `cache_context` (diffusers hands it to every `StateManager` of a stateful hook)."""

    def __init__(self):
        super().__init__(object)
        self.name: str | None = None

    def set_context(self, context) -> None:
        super().set_context(context)
        self.name = None if context is None else context.name


class PassHook(ModelHook):
    """Root hook: before each denoiser call, `callback(module, context_name, args, kwargs)`.

    `context_name` is the name of the enclosing `denoiser.cache_context(...)` ("cond", "uncond", "cond_uncond")
    or None. Stateful in diffusers' sense only so that diffusers passes it that context; it keeps no other state.
    """

    _is_stateful = True

    def __init__(self, callback):
        super().__init__()
        self.callback = callback
        self.context = _ContextName()

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.callback(module, self.context.name, args, kwargs)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.set_context(None)
        return module


class CondRows:
    """The `PassHook` callback of one denoiser: works out the untouched rows and writes them into its knob hooks."""

    def __init__(self, pipe: Any, module: torch.nn.Module, hooks: Sequence[CondRowsHook]):
        self.hooks = list(hooks)
        # PAG pipelines: the chunk count depends on the pipeline's guidance flags (read each call).
        self.pipe = weakref.ref(pipe) if hasattr(type(pipe), "do_perturbed_attention_guidance") else None
        params = list(inspect.signature(type(module).forward).parameters)[1:]
        self.x_arg, self.x_pos = params[0], 0  # the noisy latents: `sample` / `hidden_states`
        null = getattr(getattr(module, "config", None), "num_embeds_ada_norm", None)
        self.null_class = null if "class_labels" in params and isinstance(null, int) else None
        self.labels_pos = params.index("class_labels") if self.null_class is not None else None

    def __call__(self, module: torch.nn.Module, context: str | None, args: tuple, kwargs: dict) -> None:
        if not self.hooks:
            return
        x = kwargs.get(self.x_arg, args[self.x_pos] if args else None)
        rows = self.rows(context, x, args, kwargs, self.hooks[0].rows.device)
        for hook in self.hooks:
            hook.rows.copy_(rows)

    def rows(self, context: str | None, x: Any, args: tuple, kwargs: dict, device) -> torch.Tensor:
        none = torch.tensor(_NONE, device=device)
        if context == "uncond":
            return torch.tensor(_ALL, device=device)
        if context == "cond" or not isinstance(x, torch.Tensor):
            return none
        labels = None
        if self.null_class is not None:
            labels = kwargs.get("class_labels", args[self.labels_pos] if len(args) > self.labels_pos else None)
        if isinstance(labels, torch.Tensor):  # DiT: [labels, null class]; PixArt passes None and repeats latents
            has_null = (labels == self.null_class).any()
            return torch.where(has_null, torch.tensor((2, 1, 2), device=device), none)
        k = 2
        pipe = self.pipe() if self.pipe is not None else None
        if pipe is not None and hasattr(pipe, "_guidance_scale") and hasattr(pipe, "_pag_scale"):
            if not pipe.do_classifier_free_guidance:  # PAG without guidance: [cond, perturbed]
                return none
            k = 2 + bool(pipe.do_perturbed_attention_guidance)
        n = x.shape[0]
        if n % k:
            return none
        chunks = x.reshape(k, -1)
        same = (chunks == chunks[:1]).all()  # the batch repeats its latents: a guidance batch, uncond first
        return torch.where(same, torch.tensor((k, 0, 1), device=device), none)
