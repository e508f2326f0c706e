"""The one place memctl installs and removes hooks (diffusers `HookRegistry`, `pre_forward`/`post_forward` only).

    >>> with scaled(unet, find_blocks(unet, names=["mid_block"]), 0.0):  # ablate the mid block
    ...     eps = unet(x, t, encoder_hidden_states=c).sample
    >>> list_hooks(unet)  # nothing left behind
    []

Hooks are global state on the modules they wrap: a hook left attached changes every later call of the model, in
every pipeline sharing it. Temporary hooks therefore live in context managers (`attached`, `scaled`, `recorded`)
that remove exactly what they added, in reverse order, even when the forward raises; persistent ones (the knob) go
through `attach`/`detach` under one hook name. `list_hooks` shows what memctl has attached.

Residual scaling is exact at scale 1: branch mode computes `out * s`, delta mode `out + (s - 1) * (out - inp)`,
both equal to `out` bit for bit (up to the sign of a zero) when `s == 1`. The scale `s` is a 0-d non-persistent
buffer on the hooked module, so it follows `.to(device/dtype)`, is changed in place (`.fill_`) without
re-registering anything, and never makes `torch.compile` recompile. Hooks are written with `pre_forward` and
`post_forward` only: a hook using `new_forward` breaks diffusers' removal of earlier hooks
(diffusers' `remove_hook` then restores the wrong `forward`; `memctl.registry.detach` warns of it).
Attaching and removing (the part that touches diffusers' registry internals) lives in `memctl.registry`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import ModelHook

from memctl import subspace
from memctl.blocks import Block, unwrap
from memctl.registry import attach, attached, detach, list_hooks

__all__ = [
    "KNOB",
    "CLOCK",
    "ResidualScaleHook",
    "ConditionHook",
    "PullCache",
    "cross_attentions",
    "RecordHook",
    "TimestepHook",
    "ScaleSet",
    "attach",
    "detach",
    "attached",
    "scaled",
    "recorded",
    "list_hooks",
]

KNOB = "memctl.knob"  # per-block residual scaling of the fidelity knob
CLOCK = "memctl.knob.clock"  # root hook reading the timestep of each denoiser call


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights (else buffers) live; CPU for a module with neither."""
    return next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device


def _arg_position(module: torch.nn.Module, arg: str) -> int | None:
    """Position of `arg` among the positional arguments of `module.forward` (None if it has no such parameter)."""
    params = list(inspect.signature(type(module).forward).parameters)[1:]  # drop self
    return params.index(arg) if arg in params else None


def _get_arg(args: tuple, kwargs: dict, arg: str, pos: int | None) -> Any:
    if arg in kwargs:
        return kwargs[arg]
    return args[pos] if pos is not None and pos < len(args) else None


def _set_arg(args: tuple, kwargs: dict, arg: str, pos: int | None, value: Any) -> tuple[tuple, dict]:
    """`(args, kwargs)` with `arg` (found as `_get_arg` finds it) replaced by `value`; new containers."""
    if arg not in kwargs and pos is not None and pos < len(args):
        return (*args[:pos], value, *args[pos + 1 :]), kwargs
    return args, {**kwargs, arg: value}


class _InputsOfDelta(ModelHook):
    """Shared by hooks that need a delta-mode block's inputs: grabs them in `pre_forward` for `post_forward`."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block
        # (hidden input, encoder input) of the call in flight; one slot, so a forward that raised leaves nothing
        # behind that the next call would read (a module does not re-enter its own forward).
        self._pending: tuple[Any, Any] = (None, None)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        b = self.block
        self._pos = _arg_position(module, b.input_arg), _arg_position(module, b.encoder_arg)
        return module

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.block.mode == "delta":
            hidden = _get_arg(args, kwargs, self.block.input_arg, self._pos[0])
            if hidden is None:
                hidden = args[0] if args else None
            self._pending = (hidden, _get_arg(args, kwargs, self.block.encoder_arg, self._pos[1]))
        return args, kwargs

    def _split(self, output: Any) -> tuple[list[Any] | None, torch.Tensor, Any, Any]:
        """(output as a list or None for a tensor, hidden output, hidden input, encoder input)."""
        (inp, enc), self._pending = self._pending, (None, None)
        if isinstance(output, torch.Tensor):
            return None, output, inp, enc
        items = list(output)
        return items, items[self.block.output_index], inp, enc

    def _update(self, out: torch.Tensor, inp: torch.Tensor | None) -> torch.Tensor:
        if self.block.mode == "branch":
            return out
        if not isinstance(inp, torch.Tensor) or inp.shape != out.shape:
            got = tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__
            raise ValueError(
                f"Expected block {self.block.name!r} to return input + update with its input's shape, but got "
                f"output {tuple(out.shape)} for input {got}. It is not a residual block in delta mode: hook the "
                f"module that outputs its residual branch instead (mode='branch')."
            )
        return out - inp


class ResidualScaleHook(_InputsOfDelta):
    """Scale a block's residual update by a 0-d buffer `s` on the hooked module (1 = untouched, 0 = ablated).

    >>> block = find_blocks(unet)[0]
    >>> hook = ResidualScaleHook(block, "memctl.demo", value=0.5)
    >>> with attached(unet, {block.target: hook}, "memctl.demo"):
    ...     _ = hook.scale.fill_(0.0)  # in place: ablated from the next call on
    """

    def __init__(self, block: Block, name: str, value: float = 1.0):
        super().__init__(block)
        self.buffer = "_" + name.replace(".", "_") + "_scale"
        self.value = float(value)
        self._module: torch.nn.Module | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        super().initialize_hook(module)
        device = module_device(module)
        module.register_buffer(self.buffer, torch.tensor(self.value, device=device), persistent=False)
        self._module = module
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' spelling)
        module._buffers.pop(self.buffer, None)
        self._module = None
        return module

    @property
    def scale(self) -> torch.Tensor:
        """The live 0-d scale; change it in place (`.fill_`, `.copy_`)."""
        return getattr(self._module, self.buffer)

    def factor(self, module: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
        """The factor `out`'s update is scaled by: the 0-d scale (subclasses: per row, per pass, ...)."""
        return getattr(module, self.buffer)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        items, out, inp, enc = self._split(output)
        f = self.factor(module, out)
        new = out * f if self.block.mode == "branch" else out + (f - 1) * self._update(out, inp)
        if items is None:
            return new
        items[self.block.output_index] = new
        e = self.block.encoder_index
        if self.block.mode == "delta" and e is not None and items[e] is not None and isinstance(enc, torch.Tensor):
            items[e] = items[e] + (self.factor(module, items[e]) - 1) * (items[e] - enc)
        return type(output)(items)


def tensor_key(t: torch.Tensor) -> tuple:
    """Where a tensor's values live and which write of them it holds: equal keys, equal values, while the tensor
    with that key is kept alive (its memory cannot then be reused by another tensor)."""
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def latents_arg(module: torch.nn.Module) -> str:
    """The name of the noisy latents' parameter of `module.forward`: its first (`sample`: UNets; `hidden_states`)."""
    return list(inspect.signature(type(module).forward).parameters)[1]


def unkeyable(e: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a cache must not key on these tensors: while `torch.compile` traces (a graph would guard on the cache),
    when `e` requires grad, or for inference tensors (no version counter to key on)."""
    return torch.compiler.is_compiling() or e.requires_grad or any(t.is_inference() for t in (e, *others))


def recent(entries: dict, key: tuple, make: Callable[[], Any], size: int) -> Any:
    """The entry of `entries` under `key`, made by `make()` if missing (the oldest dropped to keep at most `size`),
    and moved to the end: `entries` stays in least-recently-used order."""
    hit = entries.pop(key, None)
    if hit is None:
        hit = make()
        while len(entries) >= size:
            entries.pop(next(iter(entries)))
    entries[key] = hit
    return hit


class PullCache:
    """The α-independent parts of the pull (`memctl.subspace.pull_parts`) of the last few conditionings seen.

    The text states of a pipeline call stay the same tensor for every step and every cross-attention unit, so the
    token weights and the nearest general conditioning are computed once per call, not once per attention. Keyed on
    the input's and the lever tensors' memory, shape, strides and version counter (an in-place edit is a new key);
    the inputs of the cached entries are kept alive so that their memory is not reused under the same key. Where
    the denoiser rebuilds its conditioning in every forward (Wan's `attn2` reads the output of the transformer's
    text projection, a new tensor per step), a key miss is checked against the cached inputs of the same lever
    tensors by value (`torch.equal`: one comparison, far cheaper than the parts), so the parts are still computed
    once per conditioning, bit-identical. Not used while `torch.compile` traces (the compiled graph computes the
    parts itself, with no guards on this cache) nor for inputs that require grad.
    """

    def __init__(self, size: int = 4):
        self.size, self.entries = int(size), {}  # key -> (input kept alive, w, g)

    def parts(self, e, read, tau, bank) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (e, read, tau, bank)
        if unkeyable(*tensors):
            return subspace.pull_parts(e, read, tau, bank)
        key = tuple(tensor_key(t) for t in tensors)
        hit = recent(self.entries, key, lambda: self._same_values(key, e) or self._make(e, read, tau, bank), self.size)
        return hit[1], hit[2]

    def _same_values(self, key: tuple, e: torch.Tensor) -> tuple | None:
        """The cached entry for the same lever tensors whose input, unchanged since it was cached, holds `e`'s
        values, taken out of the cache and returned with `e` kept alive in its place (to be stored under `key`)."""
        for k, (kept, w, g) in reversed(self.entries.items()):
            same_kind = (kept.shape, kept.dtype, kept.device) == (e.shape, e.dtype, e.device)
            if k[1:] == key[1:] and same_kind and tensor_key(kept) == k[0] and torch.equal(kept, e):
                del self.entries[k]
                return e, w, g
        return None

    @staticmethod
    def _make(e, read, tau, bank) -> tuple:
        return (e, *subspace.pull_parts(e, read, tau, bank))

    def clear(self) -> None:
        self.entries.clear()


class ConditionHook(ModelHook):
    """Pull the memorized tokens of a cross-attention's conditioning toward the nearest general conditioning.

    `e -> e + (1 - s) w(e) (g(e) - e)` (see `memctl.subspace.pull_to_general`) on `encoder_hidden_states` of an
    `Attention` module, before its keys and values: `s` is a 0-d buffer like `ResidualScaleHook.scale`: 1 leaves
    the input untouched (exactly), 0 replaces memorized tokens, below 0 pulls them past the general ones (the knob
    at fidelity < 0 with `pull_max` > 1), above 1 pushes them further from the general ones. `w` and `g` come from
    `cache` (a `PullCache`; hooks sharing one compute them once per conditioning for all their units).
    """

    _TENSORS = ("read", "tau", "bank")

    def __init__(
        self, name: str, tensors: Mapping[str, torch.Tensor], value: float = 1.0, cache: PullCache | None = None
    ):
        super().__init__()
        self.buffer = "_" + name.replace(".", "_") + "_scale"
        self.tensors, self.value = {k: tensors[k] for k in self._TENSORS}, float(value)
        self.cache = cache if cache is not None else PullCache()
        self._module: torch.nn.Module | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        device = module_device(module)
        module.register_buffer(self.buffer, torch.tensor(self.value, device=device), persistent=False)
        for k, v in self.tensors.items():
            module.register_buffer(f"{self.buffer}_{k}", v.to(device), persistent=False)
        self._module = module
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' spelling)
        for suffix in ("", *(f"_{k}" for k in self._TENSORS)):
            module._buffers.pop(self.buffer + suffix, None)
        self.cache.clear()
        self._module = None
        return module

    @property
    def scale(self) -> torch.Tensor:
        return getattr(self._module, self.buffer)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if e is None:
            return args, kwargs
        read, tau, bank = (getattr(module, f"{self.buffer}_{k}") for k in self._TENSORS)
        w, g = self.cache.parts(e, read, tau, bank)
        new = subspace.pull_with(e, w, g, 1 - getattr(module, self.buffer))
        if "encoder_hidden_states" in kwargs or len(args) < 2:
            kwargs["encoder_hidden_states"] = new
        else:
            args = (args[0], new, *args[2:])
        return args, kwargs


CROSS_ATTENTIONS = ("Attention", "WanAttention")  # attention classes whose `is_cross_attention` the lever trusts


def cross_attentions(model: torch.nn.Module, block: Block) -> list[str]:
    """Dotted paths of the cross-attention modules inside a block: diffusers' `Attention` (UNets, PixArt, Sana) and
    `WanAttention` (Wan's `attn2`) with `is_cross_attention`, which take the conditioning as
    `encoder_hidden_states` (keyword or second argument)."""
    root = unwrap(model).get_submodule(block.name)
    return [
        f"{block.name}.{n}"
        for n, m in root.named_modules()
        if type(m).__name__ in CROSS_ATTENTIONS and getattr(m, "is_cross_attention", False)
    ]


class RecordHook(_InputsOfDelta):
    """Append `reduce(update)` (or `reduce(output)` with `what="output"`) of each call to `store`, detached."""

    def __init__(self, block: Block, store: list, what: str = "residual", reduce: Callable | None = None):
        super().__init__(block)
        if what not in ("residual", "output"):
            raise ValueError(f"Expected what='residual' or 'output', but got {what!r}.")
        self.what, self.store, self.reduce = what, store, reduce

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        _, out, inp, _ = self._split(output)
        value = out if self.what == "output" else self._update(out, inp)
        value = value.detach()
        self.store.append(self.reduce(value) if self.reduce is not None else value)
        return output


class TimestepHook(ModelHook):
    """Root hook: reads the denoiser's `timestep` argument and calls `callback(module, t)` before each forward.

    `t` is a 0-d float tensor, the largest timestep of the batch divided by `scale` (the pipeline's
    `num_train_timesteps`, so that `t` is the normalized noise level in [0, 1]; Flux-like pipelines already divide
    by 1000 and use `scale=1`). Works in every pipeline, including those without `callback_on_step_end`.
    """

    def __init__(self, callback: Callable[[torch.nn.Module, torch.Tensor], None], scale: float = 1000.0):
        super().__init__()
        self.callback, self.scale = callback, float(scale)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._pos = _arg_position(module, "timestep")
        if self._pos is None:
            raise ValueError(
                f"Expected {type(module).__name__}.forward to take a `timestep` argument, but its parameters are "
                f"{list(inspect.signature(type(module).forward).parameters)[1:]}."
            )
        return module

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        t = _get_arg(args, kwargs, "timestep", self._pos)
        if t is not None:
            t = t.detach() if isinstance(t, torch.Tensor) else torch.tensor(float(t))
            self.callback(module, t.float().reshape(-1).max() / self.scale)
        return args, kwargs


class ScaleSet:
    """Live residual scales of hooked blocks, by block name: `scales.set("mid_block", 0.5)` changes them in place."""

    def __init__(self, hooks: Mapping[str, list[ResidualScaleHook]]):
        self.hooks = dict(hooks)

    def set(self, block: str | Block, value: float | torch.Tensor) -> None:
        for hook in self.hooks[block.name if isinstance(block, Block) else block]:
            hook.scale.copy_(torch.as_tensor(value))

    def get(self, block: str | Block) -> float:
        return float(self.hooks[block.name if isinstance(block, Block) else block][0].scale)

    def names(self) -> list[str]:
        return list(self.hooks)


def _check_free(hooks: Mapping[str, _InputsOfDelta], path: str, leaf: Block) -> None:
    if path in hooks:
        raise ValueError(
            f"Expected blocks that do not overlap, but {hooks[path].block.name!r} and {leaf.name!r} both hook "
            f"{path!r}. Pass either a stage or its units, not both."
        )


@contextmanager
def scaled(
    model: torch.nn.Module, blocks: Iterable[Block], scale: float = 0.0, name: str = "memctl.scale"
) -> Iterator[ScaleSet]:
    """Scale the residual updates of `blocks` (stages: all their units) by `scale` inside the `with` block.

    >>> with scaled(unet, find_blocks(unet)[:3], 0.0) as scales:  # ablate three units
    ...     a = unet(**inputs).sample
    ...     scales.set(find_blocks(unet)[0], 0.5)  # in place, no re-registration
    ...     b = unet(**inputs).sample
    """
    groups: dict[str, list[ResidualScaleHook]] = {}
    hooks: dict[str, ResidualScaleHook] = {}
    for block in blocks:
        for leaf in block.leaves():
            hook = ResidualScaleHook(leaf, name, scale)
            groups.setdefault(block.name, []).append(hook)
            _check_free(hooks, leaf.target, leaf)
            hooks[leaf.target] = hook
    with attached(model, hooks, name):
        yield ScaleSet(groups)


@contextmanager
def recorded(
    model: torch.nn.Module,
    blocks: Iterable[Block],
    what: str = "residual",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    name: str = "memctl.record",
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each unit's residual update (or output) per call, detached, keyed by unit name.

    >>> with recorded(unet, find_blocks(unet), reduce=lambda r: r.pow(2).mean()) as rec:
    ...     _ = unet(**inputs)
    >>> len(rec["mid_block.resnets.0"]), rec["mid_block.resnets.0"][0].shape
    (1, torch.Size([]))

    `what="output"` records the hidden-state output of the unit itself (for a branch-mode unit, the module `name`
    rather than its branch end). `reduce` keeps memory small (e.g. a per-channel mean).
    """
    store: dict[str, list[torch.Tensor]] = {}
    hooks: dict[str, RecordHook] = {}
    for block in blocks:
        for leaf in block.leaves():
            path = leaf.name if (what == "output" and leaf.mode == "branch") else leaf.target
            _check_free(hooks, path, leaf)
            hooks[path] = RecordHook(leaf, store.setdefault(leaf.name, []), what, reduce)
    with attached(model, hooks, name):
        yield store
