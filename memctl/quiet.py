"""`quiet(pipe)`: memctl's own loops over pipeline calls without diffusers' progress bars or repeated warnings.

    >>> with quiet(pipe):                      # what memctl.detect and memctl.probe run their loops in
    ...     images = pipe("ab", num_inference_steps=2, height=8, width=8).images

A detection or probe calls the pipeline (or its prompt encoder) dozens of times; each call would draw a progress
bar (left half-finished when detection stops the call early) and repeat warnings such as diffusers' "The following
part of your input was truncated because CLIP can only handle sequences up to 77 tokens". Inside the block the
pipeline's bars are off and diffusers' and transformers' loggers show errors only; afterwards the pipeline's own
progress-bar settings and both verbosities are back as they were, even on exceptions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

_MISSING = object()


@contextmanager
def quiet(pipe) -> Iterator[None]:
    """No progress bars from `pipe`, and only errors from diffusers' and transformers' loggers, inside the block."""
    config = pipe.__dict__.get("_progress_bar_config", _MISSING)  # diffusers keeps it as a plain attribute
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**{**(config if isinstance(config, dict) else {}), "disable": True})
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if config is _MISSING:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe.__dict__["_progress_bar_config"] = config
