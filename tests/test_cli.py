"""The `memctl` command line: help without torch, a description and shown defaults on every subcommand."""

import subprocess
import sys

import pytest

import memctl
import memctl.detection
from memctl import cli, defaults

SUBCOMMANDS = ("demo", "bench", "blocks", "render", "ui", "probe", "detect", "bake", "check")


def _help(*argv: str) -> str:
    """`memctl ARGV --help`, whitespace collapsed (argparse wraps lines)."""
    parser = cli.build_parser()
    for name in argv:
        parser = parser._subparsers._group_actions[0].choices[name]
    return " ".join(parser.format_help().split())


def test_help_imports_no_torch():
    """`memctl --help` and every subcommand's help build without importing torch, diffusers or Gradio."""
    code = (
        "import sys\nfrom memctl.cli import build_parser\np = build_parser()\n"
        "for sub in p._subparsers._group_actions[0].choices.values(): sub.format_help()\n"
        "import memctl\nprint(sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_subcommand_has_a_description_and_its_defaults():
    top = _help()
    assert all(name in top for name in SUBCOMMANDS)
    assert set(cli.build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMANDS)
    for name in SUBCOMMANDS:
        text = _help(name)
        description = text.split("options:")[0].split("]", 1)[-1]
        assert len(description.split()) >= 8, f"`memctl {name} --help` has no description: {text[:300]}"
        assert "(default: None)" not in text
    expected = {
        "demo": ["--out OUT output folder (default: out/demo)", "(default: 8)", "(default: 25)",
                 "guidance scale (default: the testbed's own)"],
        "bench": ["(default: bench/results)", "(default: ['digits-s0',", "'digits-attr-s1'])", "(default: 0)",
                  "(default: False)"],
        "blocks": ["(default: unit)", "print JSON instead of a table (default: False)"],
        "render": ["(default: out/render/<job file name>)", "-m memctl render"],
        "ui": ["port to serve on (default: 7860)", "(default: 127.0.0.1)", "(default: digits)"],
        "probe": ["(default: condition)", "evaluations use 10000+) (default: 0)", "(default: False)"],
        "detect": [f"exceeds this (default: {defaults.THRESHOLD})", "(default: 4)", "(default: 7.5)",
                   "prompts per pipeline call (default: 8)", "(default: False)"],
        "bake": ["--fidelity FIDELITY fidelity to bake, in [-1, 0]", "(default: 1.0)", "not bakeable"],
        "check": ["--against DATA_DIR", "(default: pixels)", "(default: 0.3333333333333333)"],
    }  # fmt: skip
    for name, words in expected.items():
        text = _help(name)
        assert all(w in text for w in words), (name, [w for w in words if w not in text])
    assert "memctl.render" not in _help("render")  # the README's `-m memctl render`


def test_threshold_lives_in_one_torch_free_place():
    assert memctl.detection.THRESHOLD is defaults.THRESHOLD
    assert cli.build_parser().parse_args(["detect", "p.txt"]).threshold == defaults.THRESHOLD


def test_render_is_registered():
    args = cli.build_parser().parse_args(["render", "job.yaml", "--out", "d", "--force"])
    assert (args.job, args.out, args.force, args.func) == ("job.yaml", "d", True, cli._cmd_render)


def test_package_names_load_on_first_use():
    """`import memctl` is light; `memctl.probe` stays the function even after the submodule of that name loads."""
    code = (
        "import sys, memctl\nassert 'torch' not in sys.modules, 'torch imported by import memctl'\n"
        "from memctl.probe import attribute_prompt\nimport memctl.knob\n"
        "print(memctl.probe.__module__, memctl.probe.__name__, type(memctl.video).__name__, callable(memctl.detect))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["memctl.probe", "probe", "module", "True"]
    assert sorted(memctl.__all__) == memctl.__all__
    assert all(hasattr(memctl, n) for n in memctl.__all__)
    assert set(memctl.__all__) <= set(dir(memctl))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        memctl.nope  # noqa: B018


def test_bench_noise_is_for_the_effect_suite_only(monkeypatch):
    """`--noise` reaches the effect bench (per-prompt unless asked), and another suite refuses it instead of
    ignoring it."""
    import memctl.bench

    seen = {}
    monkeypatch.setattr(memctl.bench, "run_bench", lambda suite, out, **kw: seen.update(suite=suite, **kw))
    parser = cli.build_parser()
    for argv, noise in ((["bench", "effect"], "per-prompt"), (["bench", "effect", "--noise", "shared"], "shared")):
        args = parser.parse_args(argv)
        assert args.func(args) == 0 and seen["noise"] == noise
    args = parser.parse_args(["bench", "detect", "--noise", "shared"])
    with pytest.raises(ValueError, match="--noise with the effect suite only, but got --noise shared with detect"):
        args.func(args)
