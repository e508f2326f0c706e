"""memctl's Gradio app (`memctl ui`): models, block-map heat-map, the fidelity knob, sweeps, A/B views, detection.

>>> from memctl.ui import create_demo, launch  # doctest: +SKIP
>>> launch(create_demo(), port=7860)          # doctest: +SKIP

Names load lazily, so `from memctl.ui.cli import add_cli` (for `memctl --help`) does not import Gradio.
"""

import importlib

_EXPORTS = {
    "create_demo": "memctl.ui.app",
    "launch": "memctl.ui.app",
    "Engine": "memctl.ui.engine",
    "add_cli": "memctl.ui.cli",
    "main": "memctl.ui.cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'memctl.ui' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
