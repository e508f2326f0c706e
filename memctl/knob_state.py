"""The knob's law and its per-call state: `knob_law` turns scores and a fidelity into per-block factors, and the
`_KnobState` that `memctl.knob.apply_knob` leaves on a denoiser evaluates it at each step's noise level.

    >>> knob_law(torch.tensor([1.0, -1.0]), 0.0)  # fidelity 0: exactly the untouched model
    tensor([1., 1.])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook

from memctl.attention_guidance import DEFAULT_FIDELITY_MODE, AttentionGuide
from memctl.blockmap import BlockMap
from memctl.guidance import GuidanceHook
from memctl.hooks import ResidualScaleHook
from memctl.registry import attach, detach

__all__ = ["KnobInfo", "knob_law"]

STATE_ATTR = "_memctl_knob"  # the `_KnobState` on a knobbed denoiser (pipelines sharing the module share it)


def knob_law(
    scores: torch.Tensor,
    fidelity: float | torch.Tensor,
    strength: float = 1.0,
    scale: float | None = None,
    floor: float = 0.0,
) -> torch.Tensor:
    """Per-block factors: clamp(1 + strength * fidelity * score / scale, floor, 2), scale = max |score| by default.

    >>> knob_law(torch.tensor([2.0, -1.0, 0.0]), -0.5)
    tensor([0.5000, 1.2500, 1.0000])

    Pure and shape-preserving (`scores` may be `(n_blocks,)` or `(n_blocks, n_levels)`); fidelity < 0 shrinks
    memorization-heavy blocks (score > 0) and boosts generalization-heavy ones; fidelity 0 gives exactly 1.0.
    `floor` < 0 is for the condition lever, whose factor s pulls memorized tokens by 1 - s: past the general
    conditioning for s < 0.
    """
    if scale is None:
        m = scores.abs().max()
        norm = scores / torch.where(m > 0, m, torch.ones_like(m))
    else:
        norm = scores / (scale if scale > 0 else 1.0)
    return (1 + strength * fidelity * norm).clamp(floor, 2)


@dataclass(eq=False)
class _KnobState:
    """What `apply_knob` put on one denoiser: its settings, the hooks it attached and the buffers it registered,
    which `remove` takes off again; its `on_timestep` is the clock hook's callback."""

    bmap: BlockMap
    component: str
    strength: float
    start: float
    stop: float
    scale: float | None
    groups: list[list[ResidualScaleHook]]  # per block of the map, its hooks (their scales are set together)
    timestep_scale: float
    fidelity_mode: str = DEFAULT_FIDELITY_MODE
    passes: str = "both"  # or "cond": the conditional pass only (set by _install)
    fidelity: float = 0.0
    guide: GuidanceHook | AttentionGuide | None = None
    pull: torch.Tensor | None = None  # (n_groups,) the lever's factors at fidelity -1 for this call
    attached: list[tuple[str, str]] = field(default_factory=list)  # (module path, hook name), in attach order
    buffers: list[str] = field(default_factory=list)

    def __post_init__(self):
        config, condition = self.bmap.lever_config, self.bmap.lever == "condition"
        self.positive_gain = config.positive_gain  # fidelity > 0 acts this much weaker
        # condition lever: fidelity > 0 guides toward the memorized component (memctl.guidance), one extra pass
        self.guidance_gain = config.fidelity_guidance if condition else 0.0
        if self.fidelity_mode == "attention" and condition and config.attention_guidance is not None:
            self.guidance_gain = config.attention_guidance  # inside the units (memctl.attention_guidance)
        if config.per_prompt_gain:  # γ per prompt: only where the extra-pass guidance reads the map's curve
            if not condition or self.fidelity_mode == "attention":
                raise ValueError(
                    "Expected per_prompt_gain with a condition map in fidelity_mode 'guidance' or 'cached', but got "
                    f"a {self.bmap.lever} map in fidelity_mode {self.fidelity_mode!r}."
                )
            if not self.bmap.meta.get("fidelity_guidance_curve"):
                raise ValueError(
                    "Expected a map with meta['fidelity_guidance_curve'] for per_prompt_gain (probe(method="
                    "'condition') with probe images makes one), but this map has none."
                )
        # γ per prompt for the extra-pass guidance (memctl.guidance), or None: the map's one γ for every prompt
        self.guidance_curve = self.bmap.meta["fidelity_guidance_curve"] if config.per_prompt_gain else None
        # condition lever, fidelity < 0: memorized tokens pulled up to `pull_max` times the way to the general ones
        self.floor = 1.0 - config.pull_max if condition else 0.0

    def attach(self, module: torch.nn.Module, hooks: Mapping[str, ModelHook], name: str) -> None:
        """`memctl.registry.attach`, remembered for `remove`."""
        self.attached += attach(module, hooks, name)

    def register(self, module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        """A non-persistent buffer on `module`, remembered for `remove`."""
        module.register_buffer(name, tensor, persistent=False)
        self.buffers.append(name)

    def remove(self, module: torch.nn.Module) -> None:
        """Take off what this state put on `module`: its hooks newest first, its buffers, itself."""
        detach(module, "", only=self.attached)
        self.attached = []
        for name in self.buffers:
            module._buffers.pop(name, None)
        self.buffers = []
        module.__dict__.pop(STATE_ATTR, None)

    def on_timestep(self, module: torch.nn.Module, t: torch.Tensor) -> None:
        f = module._memctl_knob_fidelity.float()
        now = self._factors(module, torch.where(f > 0, f * self.positive_gain, f), t)
        if self.guide is not None and self.guide.on:  # guidance contrasts with the prompt made general (no overshoot)
            self.pull = self._factors(module, -torch.ones_like(f), t, floor=0.0)
            if isinstance(self.guide, AttentionGuide):
                self.guide.set_pull(self.pull)
        for i, hooks in enumerate(self.groups):
            for hook in hooks:
                hook.scale.copy_(now[i])

    def _factors(self, module: torch.nn.Module, f: torch.Tensor, t: torch.Tensor, floor: float | None = None):
        """Per-block factors `(n_blocks,)` at fidelity `f` and noise level `t`, 1 outside the window."""
        scores = module._memctl_knob_scores.float()  # (n_blocks, n_levels); float32 whatever the model's dtype
        t = t.to(scores.device, torch.float32)
        factors = knob_law(scores, f, self.strength, self.scale, self.floor if floor is None else floor)
        if factors.shape[1] == 1:
            now = factors[:, 0]
        else:  # piecewise linear in t between recorded levels, constant beyond them
            levels = module._memctl_knob_levels.float()
            tc = t.clamp(levels[0], levels[-1])
            i = torch.searchsorted(levels, tc.reshape(1)).clamp(1, levels.shape[0] - 1)
            lo, hi = levels[i - 1], levels[i]
            w = ((tc - lo) / (hi - lo)).reshape(())
            a, b = factors.index_select(1, i - 1)[:, 0], factors.index_select(1, i)[:, 0]
            now = a + w * (b - a)
        inside = (t >= self.start) & (t <= self.stop)
        return torch.where(inside, now, torch.ones_like(now))


@dataclass(frozen=True)
class KnobInfo:
    """The knob's state on a pipeline, for metadata: `get_knob(pipe).to_dict()`."""

    block_map: BlockMap
    fidelity: float
    strength: float
    start: float
    stop: float
    components: tuple[str, ...]
    passes: str = "both"
    fidelity_mode: str | None = None  # how fidelity > 0 is computed (condition maps; None: the lever has no such side)

    def to_dict(self) -> dict[str, Any]:
        m = self.block_map
        return {
            "fidelity": self.fidelity,
            "strength": self.strength,
            "window": [self.start, self.stop],
            "components": list(self.components),
            "passes": self.passes,
            **({"fidelity_mode": self.fidelity_mode} if self.fidelity_mode is not None else {}),
            "block_map": {"method": m.method, "granularity": m.granularity, "n_blocks": m.n_blocks,
                          "per_level": m.per_level, "fingerprints": m.fingerprints, "meta": m.meta},
        }  # fmt: skip
