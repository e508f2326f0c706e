"""`memctl bench effect` on the video testbed (moving-digits): the same rows as the image testbeds, with clips.

The map is probed from prompts alone (`probe(method="prompt")`: the canary captions as memorized, the ordinary
captions as general; no clips), which on Wan's `attn2` fits the condition lever (`memctl.probe.text_states`). The
controls (uniform, text edit, placement shuffled, random subspace) and the baselines run as on the image testbeds;
a baseline whose hooks do not apply to this denoiser is recorded with its error instead of a row. Clip measures
(per-frame digit validity, motion validity, temporal change over real clips') are added to every row by
`memctl.evaluate`.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from tqdm.auto import tqdm

from memctl.blocks import pipeline_denoisers
from memctl.controls import TextEdit, control_maps
from memctl.effect import (
    BAKE_FIDELITIES,
    BASELINE_SETTINGS,
    CONTROL_FIDELITIES,
    CONTROL_SEEDS,
    KNOB_FIDELITIES,
    _headline,
    _measure,
    bake_setup,
    bars,
    baseline_setup,
    calibration_inputs,
    composed_plan,
    knob_setup,
)
from memctl.evaluate import EvalSpec
from memctl.probe import probe
from memctl.probeset import ProbeSet


def video_probes(tb) -> ProbeSet:
    """The canary captions (memorized) and every seen caption (general), without clips."""
    return ProbeSet(memorized=[(c[0], None) for c in tb.canaries], general=[(p, None) for p in tb.ordinary_prompts()])


VIDEO_STEPS = 10  # denoising steps per clip in the bench (the testbed's own default is 20): CPU time
CPU_ROWS = (
    "plain",
    "memctl map",
    "memctl map baked",
    "uniform",
    "text edit",
    "placement shuffled",
    "random subspace",
    "composed",
    "composed t ≥ 0.7",
    "composed calibrated window",
    "wen",
    "jain",
    "nemo",
)


def clip_readout(row: dict) -> dict:
    """A video row's two clip measures beside its headline: the share of the most-exposed canaries' clips whose
    nearest training clip is their bound clip, and the canaries' motion validity."""
    canary = row["canary"]
    most = max((e for e in canary if e != "all"), key=int)
    return {"nearest_bound": canary[most]["nearest_bound"], "canary_motion_valid": canary["all"]["motion_valid"]}


def is_video(name: str) -> bool:
    """Is `name` (a testbed name or folder) a video testbed?"""
    from memctl.zoo.testbed import TESTBEDS, assets_dir

    path = Path(name) if (Path(name) / "testbed.json").is_file() else assets_dir() / TESTBEDS.get(name, name)
    try:
        return json.loads((path / "testbed.json").read_text()).get("name") == "moving-digits"
    except (OSError, json.JSONDecodeError):
        return False


def video_composed_plan(tb, pipe, steps: int = VIDEO_STEPS) -> list[tuple[str, str, object]]:
    """`memctl.effect.composed_plan` for a video testbed, the window calibrated as `calibration_inputs` says (the
    canaries' bound clips, as the prompt-only probes have none; near copies against all training clips), with the
    bench's steps."""
    memorized, reference, calibration = calibration_inputs(tb)
    return composed_plan(pipe, tb.prompt_parts, memorized, reference, steps=steps, guidance=tb.guidance, **calibration)


def effect_for_video(
    name: str = "moving-digits",
    seeds: int = 2,
    steps: int = VIDEO_STEPS,
    progress: bool = True,
    families: tuple[str, ...] = CPU_ROWS,
    partial: Path | None = None,
    noise: str = "per-prompt",
) -> dict:
    """The effect rows of `families` (default: the knob, its bake, the controls, the composed rows and the wen, jain
    and nemo baselines, one setting or control seed each; every setting with `families=None`) on a video testbed,
    `noise` as in `EvalSpec`; with `partial`, the record so far is written there after
    every row, so a long CPU run keeps what it measured, and a run that finds one there resumes from it (its plain
    row must come out the same)."""
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    spec = EvalSpec(seeds=seeds, guidance=tb.guidance, steps=steps, noise=noise)
    probes = video_probes(tb)
    t0 = time.perf_counter()
    bmap = probe(pipe, probes, method="prompt", progress=progress, call_kwargs=tb.call_kwargs)
    probe_seconds = round(time.perf_counter() - t0, 1)
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    rows, errors = {"plain": {"0": plain}}, {}
    earlier = json.loads(Path(partial).read_text()) if partial is not None and Path(partial).is_file() else None
    if earlier is not None:  # resume: keep rows measured before, once the plain row is seen to be the same
        if earlier["eval"] != spec.to_dict() or _headline(tb, earlier["rows"]["plain"]["0"]) != _headline(tb, plain):
            raise ValueError(f"Expected {partial} to hold rows of this model and spec, but its plain row differs.")
        rows.update({f: dict(by) for f, by in earlier["rows"].items() if f != "plain"})
    denoiser = next(iter(pipeline_denoisers(pipe).values()))
    plan = [("memctl map", f"{f:+.1f}", knob_setup(pipe, bmap, f, "guidance")) for f in KNOB_FIDELITIES]
    memorized = [str(c) for c in probes.conditions("memorized")]  # the bake's edit is fit on the probes' prompts
    plan += [("memctl map baked", f"{f:+.1f}", bake_setup(pipe, bmap, f, memorized)) for f in BAKE_FIDELITIES]
    plan += video_composed_plan(tb, pipe, steps)
    controls = control_maps(denoiser, bmap, seeds=CONTROL_SEEDS)
    plan += [("uniform", f"{f:+.1f}", knob_setup(pipe, controls["uniform"], f)) for f in CONTROL_FIDELITIES]
    plan += [("text edit", f"{f:+.1f}", lambda f=f: TextEdit(pipe, bmap, f).applied()) for f in CONTROL_FIDELITIES]
    for kind in ("placement shuffled", "random subspace"):
        plan += [
            (kind, f"seed {s}, -1.0", knob_setup(pipe, controls[f"{kind} {s}"], -1.0)) for s in range(CONTROL_SEEDS)
        ]
    for bname, settings in BASELINE_SETTINGS.items():
        for kw in settings:
            plan.append((bname, ", ".join(f"{k} {v}" for k, v in kw.items()), baseline_setup(pipe, bname, kw, probes)))
    if families is not None:
        one = ("-1.0", "-0.5", "+1.0", "seed 0, -1.0")  # one setting or control seed each; baselines their own
        plan = [p for p in plan if p[0] in families and (p[0] in BASELINE_SETTINGS or p[1] in one)]
        plan = [p for p in plan if p[0] in ("memctl map", "composed") or p[1] != "-0.5"]

    plan = [p for p in plan if p[1] not in rows.get(p[0], {})]
    need = {"memctl map": 3, "uniform": 1, "text edit": 1}

    def record() -> dict:
        done = {k: v for k, v in rows.items() if v}
        return {
            "testbed": tb.spec.get("name"),
            "probe_seconds": probe_seconds,
            "prompt_map": {"seconds": probe_seconds, "error": "the map itself is probed from prompts alone here"},
            "map": bmap.to_dict(),
            "eval": spec.to_dict(),
            "rows": done,
            "not_run": [f"{f} {s}" for f, s, _ in plan if s not in rows.get(f, {})],
            "errors": errors,
            "bars": bars(tb, done, seeds) if all(len(done.get(f, {})) >= n for f, n in need.items()) else None,
        }

    for family, setting, setup in tqdm(plan, desc=f"{name}: effect", unit="row", disable=not progress):
        try:
            rows.setdefault(family, {})[setting], _ = _measure(tb, pipe, spec, ref, setup)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:  # built for UNets: say so, go on
            rows.get(family, {}).pop(setting, None)  # the row may not exist yet: its measure failed first
            errors[f"{family} {setting}"] = f"{type(e).__name__}: {e}"
        if partial is not None:
            Path(partial).write_text(json.dumps(record(), indent=1) + "\n")
    return record()
