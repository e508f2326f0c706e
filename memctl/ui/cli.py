"""`memctl ui`: the app's command line. Importing this module is cheap (Gradio loads only when the app starts).

>>> import argparse
>>> parser = argparse.ArgumentParser(prog="memctl")
>>> _ = add_cli(parser.add_subparsers(dest="command"))
>>> args = parser.parse_args(["ui", "--port", "7861"])
>>> args.host, args.port, args.share
('127.0.0.1', 7861, False)
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from memctl.cli import HelpFormatter  # light: memctl's CLI imports no torch
from memctl.defaults import HOST, PORT

DESCRIPTION = (
    "The memctl Gradio app: pick a model and a block map, turn the fidelity knob, sweep it, compare A/B, and "
    "score prompts for memorization risk. Serves on this machine only unless --host says otherwise."
)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `memctl ui` on the CLI's subparsers (its handler is `args.func(args)`)."""
    p = subparsers.add_parser("ui", help="the Gradio app (on 127.0.0.1 unless --host says otherwise)",
                              description=DESCRIPTION, formatter_class=HelpFormatter)  # fmt: skip
    _add_arguments(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of `python -m memctl.ui` (the same flags as `memctl ui`)."""
    p = argparse.ArgumentParser(prog="memctl ui", description=DESCRIPTION, formatter_class=HelpFormatter)
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="embedded model name or local diffusers folder")
    p.add_argument("--host", default=HOST, help="address to bind; the default serves this machine only")
    p.add_argument("--port", type=int, default=PORT, help="port to serve on")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (opt-in)")
    p.add_argument("--allow-hub", action="store_true", help="let the model box take hub ids (downloads)")
    p.add_argument("--out", default=None, help="folder for generated PNGs (default: a temporary folder)")
    p.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASS",
        type=_auth,
        help="ask for this user name and password (Gradio's login); advised with --host or --share",
    )
    p.set_defaults(func=run_cli)


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise argparse.ArgumentTypeError("expected USER:PASS (both non-empty), e.g. --auth ada:correct-horse")
    return user, password


def exposure_warning(host: str, share: bool, auth) -> str | None:
    """A warning when the app is reachable from other machines without a login, else None.

    >>> exposure_warning("127.0.0.1", False, None) is None
    True
    >>> exposure_warning("0.0.0.0", False, None).split(":")[0]
    'memctl ui'
    """
    if auth or (host in ("127.0.0.1", "localhost", "::1") and not share):
        return None
    where = (
        "a public share link" if share else f"every network interface ({host})" if host in ("0.0.0.0", "::") else host
    )
    return (
        f"memctl ui: warning: the app is reachable through {where} without a login: anyone who reaches it can "
        "run the models and read the images. Pass --auth USER:PASS, or bind --host 127.0.0.1."
    )


def run_cli(args: argparse.Namespace) -> int:
    """Build the app from parsed flags and serve it until interrupted."""
    from memctl.ui.app import create_demo, launch
    from memctl.ui.engine import Engine

    warning = exposure_warning(args.host, args.share, args.auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    demo = create_demo(Engine(args.model, allow_hub=args.allow_hub), out_dir=args.out)
    if threading.current_thread() is threading.main_thread():  # `kill` stops the app as Ctrl-C does, so its
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # temporary folder is removed on the way out
    try:
        launch(demo, host=args.host, port=args.port, share=args.share, auth=args.auth)
    except KeyboardInterrupt:  # stopped while still starting: a normal end too (Gradio handles it once serving)
        print("memctl ui: stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m memctl.ui [--model M] [--host H] [--port P] [--share] [--allow-hub] [--out DIR]`."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
