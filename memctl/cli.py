"""memctl: find where a diffusion model memorizes, and turn one knob between faithful recall and new invention.

`memctl COMMAND --help` says what each command does and what its options default to."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path


def _cmd_demo(args) -> int:
    from memctl.demo import run_demo

    run_demo(args.model, Path(args.out), seeds=args.seeds, steps=args.steps, guidance=args.guidance)
    return 0


def _cmd_render(args) -> int:
    from memctl.render import render_job

    return 0 if render_job(args.job, args.out, force=args.force).ok else 1


def _cmd_bench(args) -> int:
    from memctl.bench import run_bench

    run_bench(args.suite, Path(args.out), models=args.models, quick=args.quick, seeds=args.seeds)
    return 0


def _cmd_blocks(args) -> int:
    from memctl.blocks import find_blocks
    from memctl.loading import load_denoisers

    rows = []
    for component, model in load_denoisers(args.model).items():
        for b in find_blocks(model, granularity=args.granularity):
            rows.append({"component": component, "name": b.name, "kind": b.kind, "stage": b.stage})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        width = max(len(r["name"]) for r in rows)
        print(f"{'component':<12} {'block':<{width}}  {'kind':<12} stage")
        for r in rows:
            print(f"{r['component']:<12} {r['name']:<{width}}  {r['kind']:<12} {r['stage']}")
    return 0


def _load_probes(spec: str, tb):
    """`--probes testbed` (the testbed's canaries and held-out digits) or a JSON file of prompt/image pairs."""
    from memctl.probeset import ProbeSet

    if spec == "testbed":
        if tb is None:
            raise ValueError("Expected --probes FILE for a model that is not a testbed, but got 'testbed'.")
        from memctl.effect import testbed_probes

        return testbed_probes(tb)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"Expected a probes JSON file or 'testbed', but {spec!r} is neither.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Expected a probes JSON file, but {path} is not JSON ({err}).") from None
    if not isinstance(raw, dict):
        from memctl.options import short_repr

        raise ValueError(
            f'Expected a JSON object {{"memorized": [...], "general": [...]}} in {path}, but got {short_repr(raw)}.'
        )
    unknown = sorted(set(raw) - {"memorized", "general"})
    if unknown:
        raise ValueError(f"Expected only the keys 'memorized' and 'general' in {path}, but got {unknown}.")
    return ProbeSet(memorized=_probe_pairs(raw, "memorized", path), general=_probe_pairs(raw, "general", path))


def _probe_pairs(raw: dict, role: str, path: Path) -> list[tuple]:
    """`[(prompt, PIL image or None)]` of one role of a probes file; a bad entry or image is named."""
    from memctl.options import short_repr

    items = raw.get(role, [])
    if not isinstance(items, list):
        raise ValueError(
            f"Expected `{role}` in {path} to be a list of {{'prompt': str, 'image': path or null}}, "
            f"but got {short_repr(items)}."
        )
    out = []
    for i, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("prompt"), str)
            or not isinstance(item.get("image"), (str, type(None)))
        ):
            raise ValueError(
                f"Expected {role}[{i}] to be {{'prompt': str, 'image': path or null}}, but got "
                f"{short_repr(item)} (in {path})."
            )
        image = item.get("image")
        if image is not None:
            image = _probe_image(path.parent / image, f"{role}[{i}] in {path}")
        out.append((item["prompt"], image))
    return out


def _probe_image(file: Path, where: str):
    from PIL import Image, UnidentifiedImageError

    if not file.is_file():
        raise FileNotFoundError(
            f"Expected {where} to name an image file, but {file} is {'a folder' if file.is_dir() else 'missing'}."
        )
    try:
        with Image.open(file) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"Expected {where} to name an image (PNG, JPEG, ...), but {file} is not one: {err}") from None


def _cmd_probe(args) -> int:
    from memctl.loading import load_model_and_testbed
    from memctl.probe import probe

    out = Path(args.output)
    _check_writable_file(out, "-o")  # before probing, which takes minutes
    if args.heatmap:
        _check_writable_file(Path(args.heatmap), "--heatmap")
    probes = None if args.probes == "testbed" else _load_probes(args.probes, None)  # a bad file fails fast
    pipe, tb = load_model_and_testbed(args.model)
    probes = _load_probes(args.probes, tb) if probes is None else probes
    bmap = probe(pipe, probes, method=args.method, seed=args.seed, progress=True)
    bmap.save(out)
    if args.json:
        print(json.dumps(bmap.to_dict(), indent=1))
    else:
        print(bmap.table())
        print(f"\nprobed in {bmap.meta['seconds']} s; wrote {out}")
    if args.heatmap:
        from memctl.plots import heatmap

        heatmap(bmap).save(args.heatmap)
    return 0


def _check_writable_file(file: Path, flag: str) -> None:
    """`file` can be written: not a folder, its folder made (so a long run does not fail at its last step)."""
    if file.is_dir():
        raise ValueError(
            f"Expected {flag} to be a file to write, but {file} is a folder. Name a file in it, e.g. "
            f"{file / 'map.safetensors'}."
        )
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"Expected {flag} in a folder that can be made, but {file.parent}: {err.strerror or err}."
        ) from None


def _positive(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, but got {text!r}")
    return value


def _read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Expected a text file of prompts (one per line), but {path!r} is not a file.")
    from memctl.detection import prompt_lines

    prompts = prompt_lines(file.read_text(encoding="utf-8"))
    if not prompts:
        raise ValueError(f"Expected at least one prompt in {path}, but it has none (blank and '#' lines skipped).")
    return prompts


def _cmd_detect(args) -> int:
    from memctl.detection import detect
    from memctl.loading import load_model_and_testbed

    prompts = _read_prompts(args.prompts)
    if args.limit is not None and len(prompts) > args.limit:
        print(
            f"memctl detect: scoring the first {args.limit} of {len(prompts)} prompts in {args.prompts} "
            f"(--limit {args.limit}).",
            file=sys.stderr,
            flush=True,
        )
        prompts = prompts[: args.limit]
    else:
        print(f"memctl detect: scoring {len(prompts)} prompts from {args.prompts}.", file=sys.stderr, flush=True)
    reference = _read_prompts(args.reference) if args.reference else None
    pipe, tb = load_model_and_testbed(args.model)
    basis = "the reference prompts"
    if reference is None and tb is not None:  # a testbed knows its ordinary prompts
        reference, basis = tb.ordinary_prompts(), f"the testbed's {len(tb.ordinary_prompts())} ordinary prompts"
    elif reference is None:
        basis = "all scored prompts (pass --reference ORDINARY.txt for a fixed baseline)"
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": args.num_inference_steps} if args.num_inference_steps else {}
    if args.signals == "magnitude":
        scores = detect(pipe, prompts, seeds=args.seeds, steps=args.steps, guidance_scale=args.guidance,
                        reference=reference, threshold=args.threshold, batch_size=args.batch_size, **kw)  # fmt: skip
    else:
        from memctl.signals import COMBINED, screen

        names = COMBINED if args.signals == "combined" else tuple(args.signals.split(","))
        scores = screen(pipe, prompts, reference or prompts, names, seeds=args.seeds, alpha=args.alpha,
                        guidance_scale=args.guidance, batch_size=args.batch_size, schedule=args.schedule,
                        progress=True, **kw)  # fmt: skip
    if args.json:
        print(json.dumps([s.to_dict() for s in scores], indent=1))
        return 0
    from memctl.signals import format_scores

    print(format_scores(scores, basis, args.threshold if args.signals == "magnitude" else args.alpha))
    return 0


def _cmd_check(args) -> int:
    from memctl.check import check_folder, format_checks

    rows = check_folder(args.out_dir, args.against, features=args.features, threshold=args.threshold)
    print(json.dumps([r.to_dict() for r in rows], indent=1) if args.json else format_checks(rows, args.threshold))
    return 0


def _cmd_bake(args) -> int:
    from memctl.bake import bake
    from memctl.blockmap import BlockMap
    from memctl.loading import load_model_and_testbed

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before loading the model
        raise ValueError(
            f"Expected -o to be a new or empty folder, but {out} "
            f"{'is a file' if not out.is_dir() else 'has files'}. Remove it or choose another folder."
        )
    prompts = _read_prompts(args.prompts) if args.prompts else None
    bmap = None if args.map == "testbed" else BlockMap.load(args.map)
    pipe, tb = load_model_and_testbed(args.model)
    if bmap is None:
        if tb is None:
            raise ValueError(
                f"Expected --map FILE for a model that is not a testbed, but got 'testbed' for {args.model}."
            )
        bmap = tb.block_map()
    if prompts is None and tb is not None and bmap.lever == "condition":
        prompts = [c[0] for c in tb.canaries]  # what the testbed's maps are probed with
    baked = bake(pipe, bmap, args.fidelity, out, strength=args.strength, prompts=prompts)
    info = baked._memctl_bake
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(
        f"baked fidelity {info['fidelity']:g} ({info['lever']} lever, {len(info['edits'])} units edited; "
        f"memorized states: {info['memorized_states'] or 'n/a'}) into {out}"
    )
    print(
        f"source {info['source_fingerprint']} -> baked {info['baked_fingerprint']}; single file "
        f"{out / 'denoiser.safetensors'}"
    )
    if info["memorized_states"] == "stand-ins from the map":
        print(
            "note: no --prompts, so the edit was fit on stand-ins made from the map, which keep far fewer "
            "answers novel and valid than the memorized prompts would: pass them with --prompts FILE."
        )
    return 0


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
    from memctl.defaults import ALPHA, THRESHOLD
    from memctl.ui.cli import add_cli as add_ui_cli  # cheap: Gradio loads only when `memctl ui` runs

    parser = argparse.ArgumentParser(prog="memctl", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(
        sub,
        "demo",
        "render the embedded default's fidelity sweep, samples and metrics to out/demo",
        "Render the embedded model's fidelity sweep (-1 new ... +1 faithful) for canary and ordinary "
        "prompts, each canary beside its bound training image, with the metrics table and the block map's "
        "heat-map.",
    )
    p.add_argument("--model", default="digits", help="testbed name or folder")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the testbed's own)")
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
        "p-value against the ordinary prompts plus decoys made from them, and a verdict (p <= --alpha). "
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
        help="'combined' (magnitude2 and contrast2, 4 denoiser evaluations per prompt and seed), 'magnitude' "
        "(first-step magnitude, risk > --threshold flags), or a comma list of memctl.signals.SIGNALS",
    )
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt (>= 2)")
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
    p.add_argument("--threshold", type=float, default=1 / 3, help="copy when d1 < threshold · d2")
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
