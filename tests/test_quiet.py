"""memctl.quiet: detect and probe loops draw no per-call progress bars and repeat no warnings; all is restored."""

import doctest
import logging

import pytest
from diffusers.utils import logging as diffusers_logging
from tiny import PIPELINE_FAMILIES, tiny_pipeline
from transformers.utils import logging as transformers_logging

import memctl
import memctl.quiet
from memctl.quiet import quiet

LONG = "abcdefghijkl"  # 14 tokens with start and end: past the tiny tokenizer's 8, so SD's encoder warns
CALL = {"num_inference_steps": 2, "height": 8, "width": 8}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def loud():
    """diffusers and transformers at warning level (conftest sets error), their messages recorded; put back after."""
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    transformers_logging.set_verbosity_warning()
    records = _Records()
    roots = [logging.getLogger("diffusers"), logging.getLogger("transformers")]  # they do not propagate
    for root in roots:
        root.addHandler(records)
    yield records
    for root in roots:
        root.removeHandler(records)
    diffusers_logging.set_verbosity(levels[0])
    transformers_logging.set_verbosity(levels[1])


def test_detect_and_probe_draw_no_bars_and_repeat_no_warnings(capfd, loud):
    pipe = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=False, desc="pipe-bar")
    pipe(LONG, guidance_scale=5.0, **CALL)
    assert "pipe-bar" in capfd.readouterr().err  # what each call in the loops would print
    assert any("was truncated" in m for m in loud.messages)
    loud.messages.clear()
    memctl.detect(pipe, [LONG, "ab"], seeds=2, progress=False, **CALL)
    probes = memctl.ProbeSet(memorized=[(LONG, None)], general=[("ba", None), ("aa", None)])
    memctl.probe(pipe, probes, method="prompt", progress=False, call_kwargs=CALL)
    err = capfd.readouterr().err
    assert "pipe-bar" not in err, (err[:300], loud.messages[:3])
    assert not loud.messages, (err[:300], loud.messages[:3])
    assert pipe._progress_bar_config == {"disable": False, "desc": "pipe-bar"}
    assert diffusers_logging.get_verbosity() == transformers_logging.get_verbosity() == diffusers_logging.WARNING


def test_quiet_restores_everything_on_errors(loud):
    pipe = tiny_pipeline("sd")  # progress bars already off: {"disable": True}
    with pytest.raises(RuntimeError), quiet(pipe):
        assert diffusers_logging.get_verbosity() == transformers_logging.get_verbosity() == diffusers_logging.ERROR
        raise RuntimeError
    assert pipe._progress_bar_config == {"disable": True}
    assert diffusers_logging.get_verbosity() == transformers_logging.get_verbosity() == diffusers_logging.WARNING
    fresh = PIPELINE_FAMILIES["sd"].builder()  # never configured: left without a config afterwards
    with quiet(fresh):
        assert fresh._progress_bar_config == {"disable": True}
    assert "_progress_bar_config" not in vars(fresh)


def test_quiet_docstring_example():
    result = doctest.testmod(memctl.quiet, extraglobs={"pipe": tiny_pipeline("sd")})
    assert result.failed == 0
    assert result.attempted == 1
