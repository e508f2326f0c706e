"""Ren et al. 2024 ("Unveiling and mitigating memorization in text-to-image diffusion models through cross
attention", ECCV): in every cross-attention, the beginning token's logit × C and the summary tokens masked."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.hooks import ModelHook

from memctl.baselines.base import HOOK, Baseline
from memctl.hooks import attached


class _ScaleFirstKey(ModelHook):
    """On a cross-attention's `to_k`: key 0 (the beginning token) × C, so its logit q·k₀ is C times larger."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def post_forward(self, module, output):
        factor = torch.ones(output.shape[-2], 1, dtype=output.dtype, device=output.device)
        factor[0] = self.c
        return output * factor


class _MaskSummary(ModelHook):
    """Root hook: `encoder_attention_mask` that keeps the beginning and prompt tokens and drops the summary tokens
    (the end token and the padding after it) of every row whose text states the owner has seen encoded."""

    def __init__(self, owner: Ren):
        super().__init__()
        self.owner = owner

    def pre_forward(self, module, *args, **kwargs):
        e = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if e is not None and kwargs.get("encoder_attention_mask") is None:
            kwargs["encoder_attention_mask"] = self.owner.mask_for(e)
        return args, kwargs


class Ren(Baseline):
    """Cross-attention rescaling: beginning-token logit × `c` (1.25 in the paper), summary tokens masked."""

    name = "ren"

    def __init__(self, pipe, c: float = 1.25, mask_summary: bool = True):
        super().__init__(pipe)
        if not c > 0:
            raise ValueError(f"Expected a logit factor c > 0, but got {c!r}.")
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ValueError(f"Expected a pipeline with text_encoder and tokenizer, but got {type(pipe).__name__}.")
        tok = pipe.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        if bos is None or tok("a").input_ids[0] != bos:
            raise ValueError(
                f"Expected a tokenizer that begins every prompt with a beginning-of-text token (CLIP's), whose logit "
                f"Ren et al. rescale, but {type(tok).__name__} adds none (T5-encoded prompts, as Wan's, have no such "
                "token): Ren's mitigation is not defined for this model."
            )
        if mask_summary and "encoder_attention_mask" not in inspect.signature(type(self.denoiser).forward).parameters:
            raise ValueError(
                f"Expected a denoiser whose forward takes `encoder_attention_mask` (to mask the summary tokens), but "
                f"{type(self.denoiser).__name__}.forward does not; pass mask_summary=False to rescale the logit only."
            )
        self.c, self.mask_summary = float(c), bool(mask_summary)
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (states (L, D), keep mask (L,)) per encoded row
        self._last: tuple | None = None  # (text states, their version, mask) of the last lookup

    def settings(self) -> dict:
        return {"c": self.c, "mask_summary": self.mask_summary}

    def _record(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs["input_ids"]
        states = output[0] if isinstance(output, tuple) else output.last_hidden_state
        eos = self.pipe.tokenizer.eos_token_id
        for row_ids, row in zip(ids, states, strict=True):
            hits = (row_ids == eos).nonzero()
            end = int(hits[0]) if len(hits) else len(row_ids)
            keep = torch.arange(len(row_ids), device=row.device) < end  # BOS and the prompt's tokens
            self._seen.append((row.detach(), keep))
        del self._seen[:-512]
        self._last = None  # a new encoding may answer differently

    def mask_for(self, e: torch.Tensor) -> torch.Tensor:
        """`(B, L)` 1 = attend, 0 = masked; rows never seen encoded keep every token. The last answer is reused
        while the pipeline passes the same, unchanged text-state tensor (every step of a call)."""
        if self._last is not None and self._last[0] is e and self._last[1] == e._version:
            return self._last[2]
        out = torch.ones(e.shape[:2], dtype=e.dtype, device=e.device)
        for b, row in enumerate(e):
            for states, keep in reversed(self._seen):
                if states.shape == row.shape and torch.equal(states.to(row.dtype), row):
                    out[b] = keep.to(out.dtype)
                    break
        self._last = (e, e._version, out)
        return out

    def hooks(self):
        hooks: dict[str, ModelHook] = {}
        for name, module in self.denoiser.named_modules():
            if getattr(module, "is_cross_attention", False) and hasattr(module, "to_k"):
                hooks[f"{name}.to_k"] = _ScaleFirstKey(self.c)
        if not hooks:
            raise ValueError(f"Expected cross-attention modules in {type(self.denoiser).__name__}, but found none.")
        if self.mask_summary:
            hooks[""] = _MaskSummary(self)
        return hooks

    @contextmanager
    def applied(self) -> Iterator:
        handle = self.pipe.text_encoder.register_forward_hook(self._record, with_kwargs=True)
        try:
            with attached(self.denoiser, self.hooks(), HOOK):
                yield self.pipe
        finally:
            handle.remove()
            self._seen.clear()
            self._last = None
