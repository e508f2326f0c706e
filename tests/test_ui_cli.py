"""`memctl ui` as a process: stopped by Ctrl-C or `kill`, it exits cleanly and removes its temporary folder."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_app_is_memctl_ui_and_loads_gradio_only_when_asked(tmp_path: Path):
    # Run outside the repository so that its root is not on sys.path: this is the installed layout.
    code = (
        "import importlib.util, sys\n"
        "import memctl, memctl.cli, memctl.ui, memctl.ui.cli\n"
        "memctl.cli.build_parser()\n"
        "assert 'gradio' not in sys.modules, 'memctl imported gradio'\n"
        # the repository's top-level ui/ holds the app's docs only: at most an empty namespace, never code
        "spec = importlib.util.find_spec('ui')\n"
        "assert spec is None or (spec.origin is None and not any(\n"
        "    f.endswith('.py') for d in spec.submodule_search_locations for f in __import__('os').listdir(d))),\\\n"
        "    'a top-level ui package with code is installed'\n"
        "import memctl.ui.app\n"
        "assert 'gradio' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_stopped_app_removes_its_temporary_folder(tmp_path: Path, stop):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    # SIGINT's default action restored first: a process started from a non-interactive shell may inherit it ignored.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"from memctl.cli import main; sys.exit(main(['ui', '--port', '{_free_port()}']))")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline and not any("Running on" in line for line in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        assert any(line.startswith("memctl ui: Running on http://127.0.0.1:") for line in lines), "".join(lines)[-999:]
        assert not any("share=True" in line for line in lines)  # Gradio's hint; this CLI's flag is --share
        folders = list(tmp_path.glob("memctl-ui-*"))
        assert len(folders) == 1
        assert folders[0].is_dir()
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 0
        assert not folders[0].exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_docstring_examples_of_controls_and_views():
    import doctest

    import memctl.ui.controls
    import memctl.ui.views

    for module in (memctl.ui.controls, memctl.ui.views):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
        assert result.attempted > 0, module.__name__


def test_handlers_keep_the_flat_signature_gradio_names_the_api_after():
    import inspect

    from memctl.ui.handlers import Handlers

    controls = ["prompt", "negative", "fidelity", "strength", "start", "stop", "seed", "steps", "guidance", "batch"]
    controls += ["frames", "fps", "fidelity_mode", "extrapolation"]
    for name, extra in [("generate", "map_label"), ("sweep", "map_label"), ("compare", "map_label")]:
        assert list(inspect.signature(getattr(Handlers, name)).parameters) == ["self", *controls, "model", extra]
    assert list(inspect.signature(Handlers.save_preset).parameters)[-2:] == ["model", "seed_used"]
