"""Attaching and removing hooks: the one module that touches diffusers' `HookRegistry` internals.

    >>> hook = ModelHook()
    >>> with attached(unet, {"mid_block": hook}, "memctl.demo"):
    ...     list_hooks(unet)
    [('mid_block', 'memctl.demo')]
    >>> list_hooks(unet)
    []

`attach` registers all hooks or none; `detach` removes them newest first and, when a module's registry is empty,
drops it and the instance-level `forward` it left, so the module is as it was (diffusers keeps both). Child
registry caches are invalidated after every change. The hook classes themselves live in `memctl.hooks`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry, ModelHook

from memctl.blocks import unwrap

__all__ = ["attach", "attached", "detach", "list_hooks"]


def attach(model: torch.nn.Module, hooks: Mapping[str, ModelHook], name: str) -> list[tuple[str, str]]:
    """Register each hook on the module at its dotted path ("" = the model) under `name`; all or nothing.

    Returns the (path, name) pairs attached, which `detach(model, name, only=...)` removes exactly.
    """
    model, done = unwrap(model), []
    try:
        for path, hook in hooks.items():
            module = model.get_submodule(path)
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if name in registry.hooks:
                raise ValueError(
                    f"Expected no hook named {name!r} on {path or type(model).__name__!r} yet, but one is attached. "
                    f"Remove it first (memctl.remove_knob, or leave the enclosing context), or use another name=."
                )
            registry.register_hook(hook, name)
            done.append((path, name))
    except BaseException:
        detach(model, name, only=done)
        raise
    _invalidate(model)
    return done


def detach(model: torch.nn.Module, name: str, only: Iterable[tuple[str, str]] | None = None) -> None:
    """Remove the hooks called `name` below `model` (or exactly the pairs in `only`), newest first, and tidy up."""
    model = unwrap(model)
    pairs = list(only) if only is not None else [(p, n) for p, n in list_hooks(model, prefix="") if n == name]
    for path, hook_name in reversed(pairs):
        module = model.get_submodule(path)
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None and hook_name in registry.hooks:
            later = registry._hook_order[registry._hook_order.index(hook_name) + 1 :]
            if any(hasattr(registry.hooks[n], "new_forward") for n in later):
                warnings.warn(
                    f"Removing {hook_name!r} from {path!r} while later hooks {later} replace forward (new_forward): "
                    f"diffusers may then skip them and keep the removed one. Remove those hooks first.",
                    stacklevel=2,
                )
            registry.remove_hook(hook_name, recurse=False)
            if not registry.hooks:
                _restore(module)
    _invalidate(model)


def _restore(module: torch.nn.Module) -> None:
    """Drop an emptied registry and the instance-level `forward` it left, so the module is as it was."""
    bound = module.__dict__.get("forward")
    if getattr(bound, "__func__", None) is type(module).forward and getattr(bound, "__self__", None) is module:
        del module.__dict__["forward"]
    del module.__dict__["_diffusers_hook"]


def _invalidate(model: torch.nn.Module) -> None:
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            registry._child_registries_cache = None


@contextmanager
def attached(model: torch.nn.Module, hooks: Mapping[str, ModelHook], name: str) -> Iterator[list[tuple[str, str]]]:
    """Hooks for the duration of a `with` block; removed in reverse order even if the body raises."""
    done = attach(model, hooks, name)
    try:
        yield done
    finally:
        detach(model, name, only=done)


def list_hooks(model: torch.nn.Module, prefix: str = "memctl.") -> list[tuple[str, str]]:
    """(module path, hook name) of every hook whose name starts with `prefix`, in module order.

    >>> with attached(unet, {"mid_block.resnets.0.conv2": ModelHook(), "": ModelHook()}, "memctl.demo"):
    ...     list_hooks(unet)
    [('', 'memctl.demo'), ('mid_block.resnets.0.conv2', 'memctl.demo')]
    """
    found = []
    for path, module in unwrap(model).named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            found += [(path, n) for n in registry.hooks if n.startswith(prefix)]
    return found
