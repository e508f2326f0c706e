"""Memorization guidance: the fidelity > 0 side of the condition lever, at one extra denoiser pass per step.

    >>> bmap.meta["fidelity_guidance"]      # γ, calibrated by probe(method="condition" | "prompt")
    0.2033
    >>> apply_knob(pipe, bmap); set_fidelity(pipe, 1.0)   # every denoiser call now runs twice
    >>> remove_knob(pipe)

For fidelity f > 0 the denoiser output becomes `out + γ f (out - pulled)`, where `pulled` is the same call with
the memorized conditioning tokens pulled toward general ones (the condition lever at fidelity -1) and
γ = `meta["fidelity_guidance"]`. It is classifier-free guidance whose "concept" is what the memorized tokens add:
it strengthens recall of what the model stored for a prompt and changes prompts without memorized tokens little
(their tokens' weights are small, so `pulled` is close to `out`; equal only for a prompt of the bank). Measured
before choosing it (`bench/fidelity_levers.py`): pushing memorized tokens further from general ones (the lever at
s > 1) and boosting their attention logits did not raise the copy rate of the least-exposed canaries; this does
(copies of any training image; where the copy's target was counted later, digits-s0's once-seen canaries copied
other training images, never their own: `bench/results/fidelity_power.md`). Fidelity <= 0 never runs the extra
pass. `pulled` is the prompt made general (pull 1), also for maps whose fidelity < 0 side pulls further
(`meta["pull_max"]`).

A map probed with images also carries `meta["fidelity_guidance_curve"]` (`memctl.calibrate.gain_curve`): γ per
prompt, larger for prompts whose pull `‖w (g − e)‖` is small (weakly memorized: one γ for all under-drives them and
over-drives the strongly memorized). With `per_prompt_gain` (`bmap.with_lever(per_prompt_gain=True)`; off by
default, see `memctl.lever_config`) each row's contrast is scaled by its prompt's γ over the map's γ, computed from
the call's text states with the condition hooks' own token weights (no extra pass).

`fidelity_mode="cached"` computes the same contrast `out - pulled` on every `GUIDANCE_EVERY`-th step of a call (the
first included) and adds the stored contrast on the steps between: 1 + 1/10 denoiser passes per step instead of 2.
The contrast is kept per conditioning: a pipeline passes its text states as the same tensor at every step, so a new
tensor (a new call, or the other pass of a two-call guidance step) starts its own count and is never given another
call's contrast. A pipeline that builds new text states at every step, or a denoiser under `torch.compile` (which
cannot key on tensor memory), gets the contrast computed at every step, as in "guidance": slower, never wrong.
Measured before choosing it (probe-side seeds 5000-5007 of digits-s0): the contrast changes slowly along the
trajectory; guiding only the high-noise or only the low-noise steps kept less of the effect than reusing it.

The hook sits innermost on the denoiser (inside the knob's clock): before the extra pass it writes the pull factors
the clock computed for this timestep into the condition hooks, calls the forward below it, and restores them. The
switch is one Python bool that changes only when fidelity crosses 0, so a compiled denoiser has at most two graphs
(with and without the extra pass) and changing fidelity on one side of 0 does not recompile.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook

from memctl.hooks import _arg_position, _get_arg, latents_arg, module_device, recent, tensor_key, unkeyable
from memctl.subspace import pull_norm

GUIDE = "memctl.knob.guide"
GUIDANCE_EVERY = 10  # fidelity_mode="cached": the contrast is computed on one step in this many (a cost budget)
# γ: at fidelity 1, half a guidance step toward the memorized component (measured: bench/results/effect.md)
DEFAULT_GAIN = 0.5


class GuidanceHook(ModelHook):
    """Root hook of a denoiser: `out + weight * (out - pulled)` while `on` (see the module docstring)."""

    def __init__(self, state, every: int = 1, size: int = 4, curve: dict | None = None, tensors=None, cache=None):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Expected `every` a positive int (steps per computed contrast), but got {every!r}.")
        self.state = state  # the knob's _KnobState: its groups of condition hooks and the pull factors per call
        self.every, self.size = every, size
        # γ per prompt (memctl.calibrate.gain_curve): each row's contrast times its prompt's γ over the map's γ
        self.curve, self.tensors, self.cache = curve, tensors, cache
        self.on = False
        self._inputs: tuple[tuple, dict] | None = None
        self._entry: list | None = None  # this call's cache entry: [text states kept alive, calls seen, contrast]
        self._stored: dict[tuple, list] = {}  # per conditioning (its tensor key and the latents' shape), oldest first
        self.extra_passes = 0  # denoiser passes this hook ran (for cost accounting)
        self.extra_rows = 0  # and their batch rows

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._pos = _arg_position(module, "encoder_hidden_states")
        self._x = latents_arg(module)
        device = module_device(module)
        module.register_buffer("_memctl_knob_guide", torch.tensor(0.0, device=device), persistent=False)
        self._module = module
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' spelling)
        module._buffers.pop("_memctl_knob_guide", None)
        return module

    def set_weight(self, weight: float) -> None:
        self._module._memctl_knob_guide.fill_(weight)
        self.on = weight > 0
        if not self.on:
            self._stored.clear()

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self._inputs, self._entry = ((args, kwargs) if self.on else None), None
        if self.on and self.every > 1:
            self._entry = self._lookup(args, kwargs)
            if self._entry is not None and self._entry[1] % self.every != 0:  # a step between: reuse the contrast
                self._inputs = None
            if self._entry is not None:
                self._entry[1] += 1
        return args, kwargs

    def _lookup(self, args: tuple, kwargs: dict) -> list | None:
        """This call's entry (made if new), or None where a call cannot be keyed (then: a contrast every step)."""
        e = _get_arg(args, kwargs, "encoder_hidden_states", self._pos)
        x = _get_arg(args, kwargs, self._x, 0)
        if not isinstance(e, torch.Tensor) or not isinstance(x, torch.Tensor) or unkeyable(e):
            return None
        # the states are kept alive in the entry: their memory cannot come back under this key
        return recent(self._stored, (tensor_key(e), tuple(x.shape)), lambda: [e, 0, None], self.size)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if not self.on:
            return output
        w = module._memctl_knob_guide
        if self._inputs is None:  # a step between two computed contrasts
            if self._entry is None or self._entry[2] is None:
                return output
            inside = (self.state.pull < 1).any().to(self._entry[2].dtype)  # 0 outside the knob's window
            return _add(output, w, inside * self._entry[2])
        args, kwargs = self._inputs
        self._inputs = None
        hooks = [h for group in self.state.groups for h in group]
        now = [h.scale.clone() for h in hooks]
        for i, group in enumerate(self.state.groups):
            for h in group:
                h.scale.copy_(self.state.pull[i])
        try:
            pulled = self.fn_ref.forward(*args, **kwargs)  # the forward below this hook: no clock, no recursion
        finally:
            for h, s in zip(hooks, now, strict=True):
                h.scale.copy_(s)
        contrast = _first(output) - _first(pulled)
        if self.curve is not None:
            contrast = contrast * self._row_gain(args, kwargs, contrast)
        if not torch.compiler.is_compiling():  # (a counter in a traced graph would be guarded on, and recompile)
            self.extra_passes += 1
            self.extra_rows += int(contrast.shape[0])
        if self._entry is not None:
            self._entry[2] = contrast
        return _add(output, w, contrast)

    def _row_gain(self, args: tuple, kwargs: dict, contrast: torch.Tensor) -> torch.Tensor | float:
        """Each row's γ from the curve over the map's γ, shaped to multiply `contrast`; 1 where the call's text
        states are not the width the curve was fitted on."""
        e = _get_arg(args, kwargs, "encoder_hidden_states", self._pos)
        read, tau, bank = (self.tensors[k] for k in ("read", "tau", "bank"))
        if (
            not isinstance(e, torch.Tensor)
            or e.dim() != 3
            or e.shape[-1] != read.shape[0]
            or e.shape[0] != len(contrast)
        ):
            return 1.0
        w, g = self.cache.parts(e, read, tau, bank)  # the condition hooks' own (one computation per conditioning)
        size = pull_norm(e, w, g)
        base = max(float(self.state.guidance_gain), 1e-12)
        rel = curve_gain(self.curve, size) / base
        return rel.to(contrast.dtype).view(-1, *([1] * (contrast.dim() - 1)))


def curve_gain(curve: dict, sizes: torch.Tensor) -> torch.Tensor:
    """γ of `memctl.calibrate.gain_curve`'s `curve` for pull `sizes` `(B,)`: float32, on their device."""
    lo, hi = curve["log_size_range"]
    x = sizes.float().clamp_min(1e-12).log().clamp(lo, hi)
    return (curve["factor"] * (curve["intercept"] + curve["slope"] * x)).clamp(0.0, curve["max_gain"])


def _first(output: Any) -> torch.Tensor:
    """The prediction in a denoiser's output: the tensor, the tuple's first item, or the output's first field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output[next(iter(output.keys()))]


def _add(output: Any, w: torch.Tensor, contrast: torch.Tensor) -> Any:
    """`output` with `w * contrast` added to its prediction, in the output's own form."""
    out = _first(output)
    return _with_first(output, out + w.to(out.dtype) * contrast)


def _with_first(output: Any, new: torch.Tensor) -> Any:
    """`output` with its prediction (see `_first`) replaced by `new`, in the output's own form."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    output[next(iter(output.keys()))] = new
    return output
