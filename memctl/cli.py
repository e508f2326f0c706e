"""memctl: find where a diffusion model memorizes, and turn one knob between faithful recall and new invention.

`memctl COMMAND --help` says what each command does and what its options default to."""

from __future__ import annotations

import argparse
import sys
import textwrap

from memctl.commands import (
    _cmd_bake,
    _cmd_bench,
    _cmd_blocks,
    _cmd_check,
    _cmd_demo,
    _cmd_detect,
    _cmd_probe,
    _cmd_render,
)


def _positive(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, but got {text!r}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help (unless None: the help says what then); description paragraphs
    wrapped, indented ones (command examples) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        paragraphs = text.strip("\n").split("\n\n")
        return "\n\n".join(textwrap.indent(p, indent) if p[:1] == " " else fill(p, width, indent) for p in paragraphs)


RENDER = """Batch renders from a job file (YAML or JSON): resumable, with provenance, on one or many processes.

    memctl render assets/example-job.yaml --out out/render/example      # one process
    accelerate launch --multi_gpu --num_processes 8 -m memctl render JOB.yaml --out DIR  # 8 GPUs; torchrun too

Every output is written atomically and recorded in DIR/manifest.jsonl (settings, seed, fingerprints, sha256); a
rerun skips outputs whose file still matches its record, and --force redoes them. Each shot of images also gets
a contact sheet, DIR/SHOT.contact.png: its seeds (rows) by fidelities (columns, -1 first), enlarged and labelled."""


def _command(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The `memctl` parser; it imports no torch, so `--help` on it and on every subcommand is instant."""
    from memctl.defaults import ALPHA, COPY_RATIO, THRESHOLD
    from memctl.ui.cli import add_cli as add_ui_cli  # cheap: Gradio loads only when `memctl ui` runs

    parser = argparse.ArgumentParser(prog="memctl", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(
        sub,
        "demo",
        "render the embedded default's fidelity sweep, samples and metrics to out/demo",
        "Render the embedded model's fidelity sweep (-1 new ... +1 faithful) for canary and ordinary "
        "prompts, each canary beside its bound training image, with the metrics table and the block map's "
        "heat-map; then the embedded video model's fidelity sweep (video-sweep.png/.gif/.mp4: the most-exposed "
        "canaries beside their bound training clips).",
    )
    p.add_argument("--model", default="digits", help="testbed name or folder")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the testbed's own)")
    p.add_argument(
        "--video", default="moving-digits", help="video testbed whose sweep is rendered too; 'none' for no video"
    )
    p.set_defaults(func=_cmd_demo)

    p = _command(
        sub,
        "bench",
        "measure a suite and write bench/results/<suite>.json",
        "Measure a suite and write SUITE.json and SUITE.md to --out: 'digits' (the embedded models at "
        "fidelity 0 and a guidance sweep), 'effect' (what the knob does to copies and novelty), 'detect' "
        "(prompt-only detection against the testbeds' ground truth), 'speed' (the knob's cost per denoiser forward "
        "against the plain model, SD 1.5- and Wan 1.3B-sized; --models is ignored).",
    )
    p.add_argument("suite", choices=["digits", "effect", "detect", "speed"], help="what to measure")
    p.add_argument("--out", default="bench/results", help="output folder")
    p.add_argument(
        "--models",
        nargs="+",
        default=["digits-s0", "digits-s1", "digits-attr-s0", "digits-attr-s1"],
        help="testbeds to measure",
    )
    p.add_argument("--quick", action="store_true", help="fewer seeds (a smoke run, not for the record)")
    p.add_argument("--seeds", type=int, default=0, help="evaluation seeds per prompt; 0 = 8, or 2 with --quick")
    p.add_argument(
        "--noise",
        choices=["per-prompt", "shared"],
        default=argparse.SUPPRESS,
        help="effect only: every prompt its own starting noises (per-prompt, the default), or all prompts the same "
        "`--seeds` noises (the records before stop 32: a row's level then rests on that many noise draws)",
    )
    p.set_defaults(func=_cmd_bench)

    p = _command(
        sub,
        "blocks",
        "list the residual blocks of a model's denoiser(s)",
        "List the residual blocks of a model's denoiser(s): the units a block map scores and the knob scales.",
    )
    p.add_argument("model", help="testbed name, diffusers pipeline folder, or denoiser folder")
    p.add_argument("--granularity", choices=["unit", "stage"], default="unit", help="one row per unit or per stage")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_blocks)

    p = _command(sub, "render", "render a job file (YAML or JSON): resumable, with a manifest", RENDER)
    p.add_argument("job", metavar="JOB", help="job file (.yaml, .yml or .json); see assets/example-job.yaml")
    p.add_argument("--out", default=None, help="output folder (default: out/render/<job file name>)")
    p.add_argument("--force", action="store_true", help="redo outputs that are already done and verified")
    p.set_defaults(func=_cmd_render)
    add_ui_cli(sub)

    p = _command(
        sub,
        "probe",
        "attribute memorization to blocks → a block map (.safetensors)",
        "Attribute memorization to the blocks of a model's denoiser and save a block map. Methods: "
        "'condition' (memorized prompt tokens swapped for general ones, one cross-attention unit at a "
        "time), 'ablation' (one unit zeroed at a time), 'prompt' (prompts only, no images).",
    )
    p.add_argument("model", help="testbed name or diffusers pipeline folder")
    p.add_argument("--probes", required=True, help="'testbed' or a JSON file {memorized: [...], general: [...]}")
    p.add_argument("-o", "--output", required=True, help="block map file to write (.safetensors)")
    p.add_argument("--method", choices=["condition", "ablation", "prompt"], default="condition",
                   help="how to attribute; 'prompt' needs prompts only (probe images may be null)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="probe noise seed, below 10000 (evaluations use 10000+)")
    p.add_argument("--heatmap", help="also write the heat-map picture (PNG) here")
    p.add_argument("--json", action="store_true", help="print the map as JSON instead of a table")
    p.set_defaults(func=_cmd_probe)

    p = _command(
        sub,
        "detect",
        "score prompts for memorization risk, without training data",
        "Score prompts for memorization risk from the first denoising steps, without training data. The default "
        "combines how hard each prompt pulls the noise prediction over two steps of a short schedule and how much "
        "that pull exceeds the pull of the prompt's own neighbour (the prompt without its last phrase); see "
        "memctl.signals. Each prompt gets its signals, a risk (mean robust z-score against ordinary prompts), a "
        "p-value against the ordinary prompts plus decoys made from them (Student-t predictive tail), and a verdict "
        "(p <= --alpha). "
        "--signals magnitude gives the first-step magnitude alone (Wen et al. 2024), as before.",
    )
    p.add_argument("prompts", help="text file, one prompt per line ('#' lines and blank lines skipped)")
    p.add_argument("--model", default="digits", help="testbed name or diffusers pipeline folder")
    p.add_argument(
        "--reference",
        help="text file of ordinary prompts that calibrate the risk score "
        "(default for a testbed: its ordinary prompts; otherwise the scored prompts themselves)",
    )
    p.add_argument(
        "--signals",
        default="combined",
        help="'combined' (magnitude2, contrast2 and sharpness, the seeds in turn: 4 denoiser evaluations per prompt "
        "and seed), 'magnitude' "
        "(first-step magnitude, risk > --threshold flags), or a comma list of memctl.signals.SIGNALS",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=8,
        help="seeds per prompt (>= 2; the combination: >= 3, one signal per seed in turn)",
    )
    p.add_argument("--steps", type=_positive, default=1, help="first denoising steps to read")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale of the read steps (> 1)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="schedule length (default: the pipeline's)")
    p.add_argument(
        "--threshold", type=float, default=THRESHOLD, help="--signals magnitude: flag prompts whose risk exceeds this"
    )
    p.add_argument("--alpha", type=float, default=ALPHA, help="flag prompts whose p-value is at most this")
    p.add_argument("--schedule", type=_positive, default=4, help="steps of the short schedule the signals read")
    p.add_argument("--batch-size", type=_positive, default=8, help="prompts per pipeline call")
    p.add_argument(
        "--limit",
        type=_positive,
        default=None,
        metavar="N",
        help="score only the first N prompts of the file (the rest are counted, not scored)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_detect)

    p = _command(
        sub,
        "check",
        "is each output image a copy of an image in your data set?",
        "For every image in OUT_DIR: its nearest image in DATA_DIR and whether it is a copy, d1 < threshold · d2 "
        "(d1, d2: distances to the nearest and second-nearest distinct data image; Gu et al. 2023). Distances on "
        "pixels, or on features from a callable you name (--features module:function).",
    )
    p.add_argument("out_dir", help="folder of generated images")
    p.add_argument("--against", required=True, metavar="DATA_DIR", help="folder of candidate training images")
    p.add_argument("--features", default="pixels", help="'pixels', or module:function mapping (N,C,H,W) to (N,D)")
    p.add_argument("--threshold", type=float, default=COPY_RATIO, help="copy when d1 < threshold · d2")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_check)

    p = _command(
        sub,
        "bake",
        "write the knob at a fidelity <= 0 into the weights → a hook-free pipeline folder",
        "Write the knob at one fidelity (-1 ... 0) into a copy of the model's weights and save a standard "
        "diffusers folder (loads without memctl where the pipeline is stock; PixelPipeline folders with "
        "memctl.load_pipeline), with denoiser.safetensors and the provenance in bake.json. Condition maps: "
        "a closed-form least-squares edit of the selected cross-attentions' key/value projections (UCE); "
        "residual maps: each factor folded into its unit's last layer. Factors are averaged over the map's "
        "noise levels. Fidelity > 0 (guidance, an extra pass per step) is not bakeable.",
    )
    p.add_argument("model", help="testbed name or diffusers pipeline folder")
    p.add_argument("--map", required=True, help="block map file (.safetensors), or 'testbed' for a testbed's own")
    p.add_argument("--fidelity", type=float, required=True, help="fidelity to bake, in [-1, 0]")
    p.add_argument("-o", "--output", required=True, help="folder to write (new or empty)")
    p.add_argument(
        "--prompts",
        help="text file of memorized prompts the condition edit is fit on (default for a "
        "testbed: its canary prompts; otherwise stand-ins made from the map)",
    )
    p.add_argument("--strength", type=float, default=1.0, help="knob strength, as in memctl.apply_knob")
    p.add_argument("--json", action="store_true", help="print the provenance as JSON")
    p.set_defaults(func=_cmd_bake)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as err:  # OSError: FileNotFoundError, a full disk, a read-only folder
        print(f"memctl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
