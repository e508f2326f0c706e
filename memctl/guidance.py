"""Memorization guidance: the fidelity > 0 side of the condition lever, at one extra denoiser pass per step.

    >>> bmap.meta["fidelity_guidance"]      # γ, calibrated by probe(method="condition" | "prompt")
    0.2033
    >>> apply_knob(pipe, bmap); set_fidelity(pipe, 1.0)   # every denoiser call now runs twice
    >>> remove_knob(pipe)

For fidelity f > 0 the denoiser output becomes `out + γ f (out - pulled)`, where `pulled` is the same call with
the memorized conditioning tokens pulled toward general ones (the condition lever at fidelity -1) and
γ = `meta["fidelity_guidance"]`. It is classifier-free guidance whose "concept" is what the memorized tokens add:
it strengthens recall of what the model stored for a prompt and leaves prompts without memorized tokens as they
were (their `pulled` equals `out`). Measured before choosing it (`bench/fidelity_levers.py`): pushing memorized
tokens further from general ones (the lever at s > 1) and boosting their attention logits did not raise the copy
rate of the least-exposed canaries; this does. Fidelity <= 0 never runs the extra pass. `pulled` is the prompt
made general (pull 1), also for maps whose fidelity < 0 side pulls further (`meta["pull_max"]`).

The hook sits innermost on the denoiser (inside the knob's clock): before the extra pass it writes the pull factors
the clock computed for this timestep into the condition hooks, calls the forward below it, and restores them. The
switch is one Python bool that changes only when fidelity crosses 0, so a compiled denoiser has at most two graphs
(with and without the extra pass) and changing fidelity on one side of 0 does not recompile.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook

from memctl.hooks import module_device

GUIDE = "memctl.knob.guide"
# γ: at fidelity 1, half a guidance step toward the memorized component (measured: bench/results/effect.md)
DEFAULT_GAIN = 0.5


class GuidanceHook(ModelHook):
    """Root hook of a denoiser: `out + weight * (out - pulled)` while `on` (see the module docstring)."""

    def __init__(self, state):
        super().__init__()
        self.state = state  # the knob's _KnobState: its groups of condition hooks and the pull factors per call
        self.on = False
        self._inputs: tuple[tuple, dict] | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
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

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self._inputs = (args, kwargs) if self.on else None
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if not self.on or self._inputs is None:
            return output
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
        w = module._memctl_knob_guide
        if isinstance(output, torch.Tensor):
            return output + w.to(output.dtype) * (output - pulled)
        if isinstance(output, tuple):
            out, other = output[0], pulled[0]
            return (out + w.to(out.dtype) * (out - other), *output[1:])
        key = next(iter(output.keys()))
        out = output[key]
        output[key] = out + w.to(out.dtype) * (out - pulled[key])
        return output
