"""What the baselines share: the denoiser, its inputs inside a hook, the empty prompt's states, hooks in a context."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import ModelHook

from memctl.blocks import require_denoisers, unwrap
from memctl.hooks import _arg_position, _get_arg, attached, latents_arg
from memctl.passes import _ContextName
from memctl.subspace import fit_length

HOOK = "memctl.baseline"


def denoiser_of(pipe) -> torch.nn.Module:
    found = require_denoisers(pipe)
    return unwrap(next(iter(found.values())))


def prompt_states(pipe, prompts: list[str]) -> torch.Tensor:
    """`(P, L, D)` text states the denoiser cross-attends to (memctl.PixelPipeline, SD 1.x/2.x, SDXL)."""
    from memctl.probe import text_states

    with torch.no_grad():
        return text_states(pipe, list(prompts))


def input_states(pipe, prompts: list[str]) -> torch.Tensor:
    """`(P, L, D)` text states as the denoiser takes them in (`encoder_hidden_states`), for hooks at its input: Wan's
    before its own text projection (zero-padded to the call's 512 tokens); else the states it cross-attends to."""
    from memctl.text_states import WAN_TOKENS

    if not type(denoiser_of(pipe)).__name__.startswith("Wan"):
        return prompt_states(pipe, prompts)
    with torch.no_grad():
        return pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=pipe._execution_device,
            max_sequence_length=WAN_TOKENS,
        )[0]


def like(states: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """One prompt's `states` `(1, L, D)` in the shape, dtype and device of a call's `e` `(B, L', D)`: cut to L', or
    extended by its last token (the padding state: T5's zero padding in Wan), then repeated over the batch."""
    return fit_length(states.to(e), e.shape[1]).expand_as(e)


def cfg_rows(x: torch.Tensor, pipe: Any = None, context: str | None = None) -> int:
    """Rows at the start of a batch that are the unconditional pass: half the batch when it splits into two
    identical halves (classifier-free guidance in one batch, unconditional first), else 0. Identical halves also
    come from repeated seeds without guidance (the same noise for two prompts), so where `pipe` says whether its
    current call guides (`do_classifier_free_guidance`, which diffusers pipelines and `memctl.PixelPipeline` keep
    for the call), a call without guidance has no unconditional rows. A pipeline that guides with two calls (Wan,
    Flux's true CFG) names each (`context`, the `cache_context` name): an "uncond" call is all unconditional, a
    "cond" call all conditional, whatever its halves hold."""
    n = x.shape[0]
    if context in ("cond", "uncond"):
        return n if context == "uncond" else 0
    if n % 2 or n == 0 or not torch.equal(x[: n // 2], x[n // 2 :]):
        return 0
    return 0 if _guides(pipe) is False else n // 2


def _guides(pipe: Any) -> bool | None:
    """Does `pipe`'s current call run classifier-free guidance? None where the pipeline does not say."""
    if pipe is None or not hasattr(pipe, "_guidance_scale"):  # set by the pipeline's __call__
        return None
    try:
        return bool(pipe.do_classifier_free_guidance)
    except (AttributeError, TypeError):
        return None


class InputsHook(ModelHook):
    """A root hook that hands (sample, timestep, encoder_hidden_states) to `edit`, which returns new states.

    Stateful in diffusers' sense only so that diffusers hands it the pipeline's `cache_context` name ("cond" /
    "uncond" where guidance runs as two calls, as in Wan): `edit` reads it as `hook.context.name`."""

    _is_stateful = True

    def __init__(self, edit):
        super().__init__()
        self.edit = edit
        self.context = _ContextName()

    def reset_state(self, module):
        self.context.set_context(None)
        return module

    def initialize_hook(self, module):
        self._pos = {a: _arg_position(module, a) for a in (latents_arg(module), "timestep", "encoder_hidden_states")}
        return module

    def pre_forward(self, module, *args, **kwargs):
        x, t, e = (_get_arg(args, kwargs, a, p) for a, p in self._pos.items())
        if e is None:
            return args, kwargs
        new = self.edit(self, x, t, e)
        pos = self._pos["encoder_hidden_states"]
        if "encoder_hidden_states" in kwargs or pos is None or len(args) <= pos:
            kwargs["encoder_hidden_states"] = new
        else:
            args = (*args[:pos], new, *args[pos + 1 :])
        return args, kwargs


class Baseline:
    """A mitigation: `fit(probes)` calibrates it from a probe set, `applied()` runs the pipeline with it."""

    name = "baseline"

    def __init__(self, pipe):
        self.pipe, self.denoiser = pipe, denoiser_of(pipe)

    def fit(self, probes) -> Baseline:
        return self

    def hooks(self) -> dict[str, ModelHook]:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    @contextmanager
    def applied(self) -> Iterator:
        with attached(self.denoiser, self.hooks(), HOOK):
            yield self.pipe


def general_prompts(probes) -> list[str]:
    prompts = [c for c, _ in probes.general if isinstance(c, str)]
    if not prompts:
        raise ValueError("Expected a probe set with general prompts (str conditions), but it has none.")
    return sorted(set(prompts))
