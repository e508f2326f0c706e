"""The fidelity knob: a block map + `fidelity` in [-1, 1] -> per-block residual scales, applied through hooks.

    >>> apply_knob(pipe, bmap, strength=1.0, start=0.0, stop=1.0)
    >>> with fidelity(pipe, -0.6):  # < 0: shrink memorization-heavy blocks
    ...     images = pipe("a seven", num_inference_steps=4).images
    >>> remove_knob(pipe)  # the untouched model again

`apply_knob` hooks every block of the map once (a 0-d scale per block, hook name `memctl.knob`) and the denoiser
itself (`memctl.knob.clock`): before each denoiser call the clock reads the timestep, turns it into the normalized
noise level t = timestep / num_train_timesteps (1 = pure noise), evaluates `knob_law` on the map's scores at t
(interpolating per-level scores), sets factors to 1 outside the window [start, stop], and writes them into the
scales in place. Changing the fidelity only fills a 0-d tensor: nothing is re-registered and `torch.compile`d
denoisers do not recompile. At fidelity 0 every factor is exactly 1.0 and the output is bit-identical to the
untouched model. The state lives on the denoiser module (`_memctl_knob`), so pipelines sharing it (`from_pipe`)
share the knob. A condition-lever map (method "condition" or "prompt") pulls memorized conditioning tokens at
fidelity < 0 and, at fidelity > 0, adds memorization guidance: by default an extra denoiser pass on every 10th step
(`memctl.guidance`).
`passes="cond"` steers the conditional pass of classifier-free guidance only (`memctl.passes`);
`temporary_knob` is the one-call form the custom pipelines' `fidelity=` / `block_map=` arguments use.

The window of noise levels where the knob acts, [start, stop] in normalized noise level, is one setting with three
spellings, each in the vocabulary of its place: `start=` / `stop=` here (and in `GenerationOptions`),
`fidelity_start=` / `fidelity_stop=` on a pipeline call (beside the pipeline's own arguments), `window: [start,
stop]` in a render job file.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from memctl.attention_guidance import (
    DEFAULT_FIDELITY_MODE,
    FIDELITY_MODES,
    AttentionGuidanceHook,
    AttentionGuide,
    check_processor,
)
from memctl.blockmap import BlockMap
from memctl.blocks import DENOISER_ATTRS, find_blocks, pipeline_denoisers, unwrap
from memctl.guidance import GUIDANCE_EVERY, GUIDE, GuidanceHook
from memctl.hooks import (
    CLOCK,
    KNOB,
    ConditionHook,
    PullCache,
    ResidualScaleHook,
    TimestepHook,
    module_device,
)
from memctl.joint import lever_paths, unit_tensors
from memctl.knob_state import STATE_ATTR, KnobInfo, _KnobState, knob_law
from memctl.passes import PASS_MODES, PASSES, CondRows, CondRowsHook, PassHook

__all__ = [
    "knob_law", "apply_knob", "set_fidelity", "fidelity", "temporary_knob", "remove_knob", "get_knob", "KnobInfo"
]  # fmt: skip

_ATTR = STATE_ATTR
_BUFFERS = ("_memctl_knob_scores", "_memctl_knob_levels", "_memctl_knob_fidelity")
# Denoisers whose pipelines pass timestep / 1000 (already a normalized noise level).
_UNIT_TIMESTEP = {
    "FluxTransformer2DModel",
    "Flux2Transformer2DModel",
    "ChromaTransformer2DModel",
    "QwenImageTransformer2DModel",
}


def _check_real(name: str, value: Any, lo: float, hi: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ValueError(f"Expected {name} in [{lo:g}, {hi:g}], but got {value!r}.")
    return float(value)


def _denoisers(target: Any) -> list[tuple[str | None, torch.nn.Module]]:
    """(component, unwrapped module) of a bare denoiser (component None) or of each denoiser a pipeline holds."""
    if isinstance(target, torch.nn.Module):
        return [(None, unwrap(target))]
    found = [(c, unwrap(m)) for c, m in pipeline_denoisers(target).items()]
    if not found:
        raise ValueError(
            f"Expected a pipeline with a denoiser ({', '.join(f'`{a}`' for a in DENOISER_ATTRS)}) or a denoiser "
            f"module, but got {type(target).__name__}."
        )
    return found


def _timestep_scale(target: Any, module: torch.nn.Module) -> float:
    if type(module).__name__ in _UNIT_TIMESTEP:
        return 1.0
    config = getattr(getattr(target, "scheduler", None), "config", None) or {}
    return float(config.get("num_train_timesteps", 1000))


def apply_knob(
    pipe_or_denoiser: Any,
    bmap: BlockMap,
    strength: float = 1.0,
    start: float = 0.0,
    stop: float = 1.0,
    timestep_scale: float | None = None,
    passes: str = "both",
    fidelity_mode: str | None = None,
) -> None:
    """Hook the map's blocks for the fidelity knob (at fidelity 0); applying again replaces the previous knob.

    >>> apply_knob(pipe, bmap, strength=0.5, start=0.0, stop=0.6)  # act only at lower noise levels
    >>> remove_knob(pipe)

    `start`/`stop` bound the window in normalized noise level t = timestep / num_train_timesteps (the pipeline's
    scheduler's, else 1000; `timestep_scale=` overrides). Outside it all factors are 1. `passes="cond"` acts on the
    conditional pass of classifier-free guidance only and leaves the unconditional prediction exactly as it was
    (see `memctl.passes` for how each pipeline's passes are told apart); the default "both" acts on every call.
    `fidelity_mode` (condition maps, fidelity > 0): "guidance", one extra denoiser pass per step (`memctl.guidance`);
    "cached", the same contrast computed on every 10th step and reused between (1.1 passes per step); or
    "attention", the same contrast inside the hooked cross-attention units (`memctl.attention_guidance`). None takes
    the map's `meta["fidelity_mode"]`, else `DEFAULT_FIDELITY_MODE` ("cached").
    """
    if not isinstance(bmap, BlockMap):
        raise TypeError(f"Expected a memctl.BlockMap, but got {type(bmap).__name__}.")
    if passes not in PASS_MODES:
        raise ValueError(f"Expected passes in {PASS_MODES}, but got {passes!r}.")
    if passes == "cond" and bmap.lever != "residual":
        raise ValueError(
            f"Expected a residual-lever map for passes='cond', but got lever={bmap.lever!r}: that lever acts on the "
            f"conditioning, which the unconditional pass does not use. Use passes='both'."
        )
    if (
        isinstance(strength, bool)
        or not isinstance(strength, numbers.Real)
        or not math.isfinite(strength)
        or strength < 0
    ):
        raise ValueError(
            f"Expected a finite strength >= 0 (use a negative fidelity to reverse), but got {strength!r}."
        )
    mode = fidelity_mode if fidelity_mode is not None else (bmap.lever_config.fidelity_mode or DEFAULT_FIDELITY_MODE)
    if mode not in FIDELITY_MODES:
        raise ValueError(f"Expected fidelity_mode in {FIDELITY_MODES}, but got {mode!r}.")
    start, stop = _check_real("start", start, 0.0, 1.0), _check_real("stop", stop, 0.0, 1.0)
    if start > stop:
        raise ValueError(f"Expected start <= stop (a window of noise levels), but got start={start}, stop={stop}.")
    pairs = _pairs(pipe_or_denoiser, bmap)
    for component, module in pairs:
        if any(p.device.type == "meta" for p in module.parameters()):
            raise ValueError(
                f"Expected the weights of {component} in memory, but they are offloaded (meta device), as "
                f"enable_sequential_cpu_offload leaves them: apply the knob before enabling sequential offload."
            )
    scale = bmap.lever_config.knob_scale or float(bmap.scores.abs().max() if bmap.n_blocks else 1.0)
    remove_knob(pipe_or_denoiser)  # every denoiser, including ones this map does not cover
    for component, module in pairs:
        try:
            ts = timestep_scale if timestep_scale is not None else _timestep_scale(pipe_or_denoiser, module)
            pipe = None if isinstance(pipe_or_denoiser, torch.nn.Module) else pipe_or_denoiser
            _install(module, bmap, component, float(strength), start, stop, scale, float(ts), passes, pipe, mode)
        except BaseException:
            remove_knob(module)
            raise


def _pairs(target: Any, bmap: BlockMap) -> list[tuple[str, torch.nn.Module]]:
    """(component, denoiser) for each component of the map."""
    found = _denoisers(target)
    if found[0][0] is None:  # a bare denoiser
        if len(bmap.fingerprints) != 1:
            raise ValueError(
                f"Expected a map of one denoiser for a bare module, but this map covers {list(bmap.fingerprints)}: "
                f"pass the pipeline instead."
            )
        return [(next(iter(bmap.fingerprints)), found[0][1])]
    held = dict(found)
    if len(bmap.fingerprints) == 1 and len(held) == 1:  # a one-denoiser map on a one-denoiser pipeline
        return [(next(iter(bmap.fingerprints)), next(iter(held.values())))]
    missing = [c for c in bmap.fingerprints if c not in held]
    if missing:
        raise ValueError(
            f"Expected the pipeline to hold the denoisers this map was made for ({', '.join(bmap.fingerprints)}), but "
            f"{type(target).__name__} has no {', '.join(missing)} (it has {', '.join(held)})."
        )
    return [(c, held[c]) for c in bmap.fingerprints]


def _install(
    module, bmap, component, strength, start, stop, scale, timestep_scale, passes="both", pipe=None, mode="guidance"
) -> None:
    part = bmap.select(component)
    part.check_model(module, component)
    blocks = find_blocks(module, names=part.names)
    groups, hooks = [], {}
    device = module_device(module)
    # one cache per denoiser: token weights and nearest general conditioning once per call, shared by the units
    # (their lever tensors are the same tensors on the device; after a move each unit holds its own copy, hence
    # room for one conditioning per unit, or two, cond and uncond, for pipelines calling the denoiser twice a step)
    cache, tensors = PullCache(), {k: v.to(device) for k, v in part.lever_tensors.items()}
    state = _KnobState(bmap, component, strength, start, stop, scale, groups, timestep_scale, mode)
    inside = mode == "attention" and state.guidance_gain > 0
    guide = AttentionGuide(groups) if inside else None
    for block in blocks:
        group = []
        paths = lever_paths(module, block) if part.lever == "condition" else []
        for path in paths:  # condition lever: pull memorized conditioning tokens in this block's cross-attention
            if inside:  # and guide inside the unit at fidelity > 0       (or entering its joint block: memctl.joint)
                check_processor(module.get_submodule(path))
                hooks[path] = AttentionGuidanceHook(KNOB, unit_tensors(tensors, path), 1.0, cache, guide)
                hooks.update(hooks[path].subhooks(path, module.get_submodule(path)))
            else:
                hooks[path] = ConditionHook(KNOB, unit_tensors(tensors, path), 1.0, cache)
            group.append(hooks[path])
        for leaf in () if paths else block.leaves():
            if leaf.target in hooks:
                raise ValueError(f"Expected blocks that do not overlap, but {block.name!r} repeats {leaf.target!r}.")
            hooks[leaf.target] = (CondRowsHook if passes == "cond" else ResidualScaleHook)(leaf, KNOB, 1.0)
            group.append(hooks[leaf.target])
        groups.append(group)
    cache.size = max(cache.size, 2 * sum(isinstance(h, ConditionHook) for h in hooks.values()))
    module.__dict__[_ATTR] = state  # from here on, a failure's remove_knob finds what to take off
    state.register(module, _BUFFERS[0], part.scores.to(device))
    levels = part.levels if part.levels is not None else torch.zeros(1)
    state.register(module, _BUFFERS[1], levels.to(device))
    state.register(module, _BUFFERS[2], torch.tensor(0.0, device=device))
    state.attach(module, hooks, KNOB)
    if inside:
        state.guide = guide
    elif state.guidance_gain > 0:  # innermost root hook: the clock (outside it) sets the factors first
        every = GUIDANCE_EVERY if mode == "cached" else 1
        state.guide = GuidanceHook(state, every, curve=state.guidance_curve, tensors=tensors, cache=cache)
        state.attach(module, {"": state.guide}, GUIDE)
    state.attach(module, {"": TimestepHook(state.on_timestep, timestep_scale)}, CLOCK)
    if passes == "cond":
        state.passes = passes
        rows = [h for h in hooks.values() if isinstance(h, CondRowsHook)]
        state.attach(module, {"": PassHook(CondRows(pipe, module, rows))}, PASSES)


def _knobbed(target: Any) -> list[tuple[torch.nn.Module, _KnobState]]:
    return [(m, m.__dict__[_ATTR]) for _, m in _denoisers(target) if _ATTR in m.__dict__]


def _set(module: torch.nn.Module, state: _KnobState, f: float) -> None:
    state.fidelity = f
    getattr(module, _BUFFERS[2]).fill_(f)
    if state.guide is not None:
        state.guide.set_weight(state.guidance_gain * f if f > 0 else 0.0)


def set_fidelity(pipe: Any, f: float) -> None:
    """Set the knob on every denoiser of `pipe` (or a bare denoiser) to fidelity `f` in [-1, 1].

    >>> apply_knob(pipe, bmap)
    >>> set_fidelity(pipe, -0.6)
    >>> remove_knob(pipe)
    """
    f = _check_real("fidelity", f, -1.0, 1.0)
    knobbed = _knobbed(pipe)
    if not knobbed:
        raise ValueError(
            f"Expected a knob on {type(pipe).__name__}, but none is applied: call memctl.apply_knob(pipe, block_map) "
            f"first."
        )
    for module, state in knobbed:
        _set(module, state, f)


@contextmanager
def fidelity(pipe: Any, f: float) -> Iterator[None]:
    """Fidelity `f` inside a `with` block; the previous value comes back after it, even on errors.

    >>> apply_knob(pipe, bmap)
    >>> with fidelity(pipe, 0.5):
    ...     images = pipe("a seven", num_inference_steps=4).images
    >>> get_knob(pipe).fidelity, remove_knob(pipe)
    (0.0, None)
    """
    before = [(m, s, s.fidelity) for m, s in _knobbed(pipe)]
    set_fidelity(pipe, f)
    try:
        yield
    finally:
        for module, state, value in before:
            _set(module, state, value)


@contextmanager
def temporary_knob(
    pipe: Any,
    fidelity: float | None = None,
    block_map: BlockMap | None = None,
    start: float | None = None,
    stop: float | None = None,
    strength: float | None = None,
    fidelity_mode: str | None = None,
) -> Iterator[None]:
    """For one call: apply `block_map` (if given), set `fidelity` and the window; afterwards restore what was there.

    >>> with temporary_knob(pipe, -0.5, bmap, start=0.2):
    ...     images = pipe("ab", num_inference_steps=2, height=8, width=8).images
    >>> get_knob(pipe) is None  # no knob before, none after
    True

    Without `block_map` it uses the knob already applied (a clear error if there is none); a map equal to the
    applied one is not re-applied, so a compiled denoiser does not recompile. A new map keeps the applied knob's
    strength and passes (else 1.0, "both"; `strength` given with a map: that one) and starts from its fidelity
    (else 0). `fidelity_mode` other than the applied knob's re-applies it in that mode for the call. All None: nothing
    happens. This is the one-call knob: the custom pipelines and the app use it.
    """
    if fidelity_mode is not None and fidelity_mode not in FIDELITY_MODES:
        raise ValueError(f"Expected fidelity_mode in {FIDELITY_MODES} or None, but got {fidelity_mode!r}.")
    if fidelity is None and block_map is None and start is None and stop is None and fidelity_mode is None:
        yield
        return
    if fidelity is not None:
        fidelity = _check_real("fidelity", fidelity, -1.0, 1.0)
    if block_map is not None and not isinstance(block_map, BlockMap):
        raise TypeError(f"Expected block_map to be a memctl.BlockMap, but got {type(block_map).__name__}.")
    before = _knobbed(pipe)
    if not before and block_map is None:
        raise ValueError(
            f"Expected a knob on {type(pipe).__name__} for fidelity=/fidelity_start=/fidelity_stop=, but none is "
            f"applied: pass block_map= too, or call memctl.apply_knob(pipe, block_map) first."
        )
    saved = [(m, s, s.fidelity, s.start, s.stop) for m, s in before]
    first = before[0][1] if before else None
    new_strength = block_map is not None and strength is not None and (first is None or strength != first.strength)
    new_mode = fidelity_mode is not None and (first is None or fidelity_mode != first.fidelity_mode)
    replace = (block_map is not None and (first is None or not block_map == first.bmap or new_strength)) or new_mode
    try:
        if replace:
            kw = {} if first is None else {"strength": first.strength, "passes": first.passes,
                                            "timestep_scale": first.timestep_scale,
                                            "fidelity_mode": first.fidelity_mode}  # fmt: skip
            if strength is not None:
                kw["strength"] = strength
            if fidelity_mode is not None:
                kw["fidelity_mode"] = fidelity_mode
            apply_knob(pipe, block_map if block_map is not None else first.bmap, **kw)
        states = _knobbed(pipe)
        lo = states[0][1].start if start is None else _check_real("fidelity_start", start, 0.0, 1.0)
        hi = states[0][1].stop if stop is None else _check_real("fidelity_stop", stop, 0.0, 1.0)
        if lo > hi:
            raise ValueError(f"Expected fidelity_start <= fidelity_stop, but got {lo} > {hi}.")
        f = fidelity if fidelity is not None else (first.fidelity if first is not None else 0.0)
        for module, state in states:
            state.start, state.stop = lo, hi
            _set(module, state, f)
        yield
    finally:
        if replace:
            remove_knob(pipe)
            if first is not None:
                apply_knob(
                    pipe,
                    first.bmap,
                    first.strength,
                    first.start,
                    first.stop,
                    first.timestep_scale,
                    first.passes,
                    first.fidelity_mode,
                )
        for module, state, f, lo, hi in saved:
            state = module.__dict__.get(_ATTR, state)  # re-applied: the new state of the same denoiser
            state.start, state.stop = lo, hi
            if _ATTR in module.__dict__:
                _set(module, state, f)


def remove_knob(pipe_or_denoiser: Any) -> None:
    """Remove the knob's hooks, buffers and state: the model is untouched again (no-op without a knob)."""
    for _, module in _denoisers(pipe_or_denoiser):
        state = module.__dict__.get(_ATTR)
        if state is not None:
            state.remove(module)


def get_knob(pipe: Any) -> KnobInfo | None:
    """The knob's state (map, fidelity, strength, window), or None without a knob.

    >>> apply_knob(pipe, bmap); set_fidelity(pipe, -0.6)
    >>> get_knob(pipe).to_dict()["fidelity"], remove_knob(pipe), get_knob(pipe)
    (-0.6, None, None)
    """
    states = [s for _, s in _knobbed(pipe)]
    if not states:
        return None
    s = states[0]
    mode = s.fidelity_mode if s.bmap.lever == "condition" else None
    return KnobInfo(
        s.bmap, s.fidelity, s.strength, s.start, s.stop, tuple(st.component for st in states), s.passes, mode
    )
