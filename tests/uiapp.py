"""A launched app for the UI tests (API and browser): one engine, a free loopback port, closed afterwards."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memctl.ui.app import create_demo, launch
from memctl.ui.engine import Engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model: str, out_dir: Path) -> Iterator[tuple[str, Engine]]:
    """`(url, engine)` of the app on 127.0.0.1 for the duration of the `with` block."""
    engine = Engine(model)
    demo = create_demo(engine, out_dir=str(out_dir))
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True)
    try:
        yield url, engine
    finally:
        demo.close()
