"""What each `memctl` command does, given its parsed arguments (the parser is in `memctl.cli`).

Each command imports the library when it runs, not when this module loads: `memctl --help` and every
subcommand's `--help` stay instant because the parser imports no torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from memctl.atomic import make_parent


def _cmd_demo(args) -> int:
    from memctl.demo import run_demo

    video = None if args.video == "none" else args.video
    run_demo(args.model, Path(args.out), seeds=args.seeds, steps=args.steps, guidance=args.guidance, video=video)
    return 0


def _cmd_render(args) -> int:
    from memctl.render import render_job

    return 0 if render_job(args.job, args.out, force=args.force).ok else 1


def _cmd_bench(args) -> int:
    from memctl.bench import run_bench

    noise = getattr(args, "noise", None)  # no default in the parser: --noise with another suite is refused
    if noise is not None and args.suite != "effect":
        raise ValueError(f"Expected --noise with the effect suite only, but got --noise {noise} with {args.suite}.")
    run_bench(
        args.suite, Path(args.out), models=args.models, quick=args.quick, seeds=args.seeds, noise=noise or "per-prompt"
    )
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
    make_parent(file, flag)


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
    from memctl.bake import bake, fit_prompts
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
    baked = bake(pipe, bmap, args.fidelity, out, strength=args.strength, prompts=fit_prompts(bmap, tb, prompts))
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
