"""memctl: find memorization- and generalization-heavy blocks in diffusion denoisers, and steer between them.

>>> import memctl
>>> pipe = memctl.load_default()
>>> len(memctl.find_blocks(pipe.unet)) > 10
True

Names load on first use (PEP 562), so `import memctl` alone, and with it `memctl --help`, does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it (None: the name is a submodule)
_EXPORTS = {
    "Block": "memctl.blocks",
    "BlockMap": "memctl.blockmap",
    "FramePackVAE": "memctl.zoo.framepack",  # the moving-digits VAE: model_index.json names it ["memctl", …]
    "GenerationOptions": "memctl.options",
    "KnobInfo": "memctl.knob",
    "PixelPipeline": "memctl.pipeline",
    "ProbeSet": "memctl.probeset",
    "PromptScore": "memctl.detection",
    "apply_knob": "memctl.knob",
    "bake": "memctl.bake",
    "detect": "memctl.detection",
    "fidelity": "memctl.knob",
    "find_blocks": "memctl.blocks",
    "fingerprint": "memctl.blockmap",
    "get_knob": "memctl.knob",
    "knob_law": "memctl.knob",
    "list_hooks": "memctl.hooks",
    "load_default": "memctl.loading",
    "load_pipeline": "memctl.loading",
    "pipeline_file": "memctl.pipelines",
    "probe": "memctl.probe",
    "remove_knob": "memctl.knob",
    "set_fidelity": "memctl.knob",
    "temporary_knob": "memctl.knob",
    "video": None,
    "zoo": None,
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'memctl' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name] or f"memctl.{name}")
    value = module if _EXPORTS[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps `memctl.probe` the function: importing the submodule `memctl.probe` sets the package's attribute of
    that name to the module (the import system's `setattr(parent, child, module)`), which would hide the function."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
