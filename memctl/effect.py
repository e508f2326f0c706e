"""`memctl bench effect`: what the knob does in samples, against controls that isolate localization and against the
published inference-time mitigations, with each row's cost.

For each embedded model: probe a condition map from its canaries and held-out images, and a prompt-only map from the
canary prompts `memctl.detect` flags, then sample every canary, ordinary and (on attribute testbeds) never-shown
combination prompt at evaluation seeds (10,000 on; probes use seeds below) for:

- memctl's knob (both maps) at fidelity −1 … +1, and the condition map baked into the weights at −1 (`memctl.bake`,
  its edit fit on the probe set's memorized prompts);
- composed extrapolation (`memctl.composed`, no map) at −1 and −0.5 on the attribute testbeds, with their caption
  parts, and at −1 only above noise level 0.7 and in the window `memctl.composed.calibrate_window` picks from the
  probe set;
- the controls of `memctl.controls`: uniform, text edit, placement shuffled, random subspace; at +1, the uniform
  map's guidance (every step and cached), which shows whether the map's placement matters on the fidelity (+) side;
- the baselines of `memctl.baselines` (Wen, Ren, Jain, NeMo), each calibrated from the probe set only.

Every row records the denoiser evaluations and seconds per image it cost (one CPU thread; seconds are comparable
within one run only).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager, nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

from memctl.attention_calibrate import attention_map
from memctl.bake import bake
from memctl.baselines import BASELINES
from memctl.composed import calibrate_window, composed, parts_for
from memctl.controls import TextEdit, control_maps
from memctl.evaluate import EvalSpec, sample_testbed, score_samples
from memctl.knob import _pairs, apply_knob, fidelity, remove_knob
from memctl.probe import probe
from memctl.probeset import ProbeSet

KNOB_FIDELITIES = (-1.0, -0.5, 1.0)
ATTENTION_FIDELITIES = (0.5, 1.0)  # memctl.attention_guidance (fidelity <= 0 is the same lever as "memctl map")
CACHED_FIDELITIES = (1.0,)  # fidelity_mode="cached" (memctl.guidance): the contrast on every 10th step
BAKE_FIDELITIES = (-1.0,)  # memctl.bake: fidelity <= 0 only
COMPOSED_FIDELITIES = (-1.0, -0.5)  # memctl.composed: fidelity <= 0 only, no map (attribute testbeds' captions)
# composed at fidelity -1 only where the noise level is >= 0.7 (row "composed t ≥ 0.7"): of the windows [0.5, 1],
# [0.7, 1], [0.85, 1] tried on moving-digits' calibration seeds 0-1 (bench/compose_lever.py --windows), the narrowest
# that left no most-exposed clip nearest its bound clip (bench/results/compose_window_video*.json)
COMPOSED_WINDOW = (0.7, 1.0)
COMPOSED_WINDOW_FAMILY = "composed t ≥ 0.7"
# composed at fidelity -1 in the window `memctl.composed.calibrate_window` chooses per model from the probe set's
# memorized pairs, sampled at calibration seeds (images 0-7, clips 0-1); never the evaluation seeds
COMPOSED_CALIBRATED_FAMILY = "composed calibrated window"
CALIBRATION_SEEDS = tuple(range(8))
VIDEO_CALIBRATION_SEEDS = (0, 1)  # composed calibrated window: clips cost ~50 transformer calls each
CONTROL_FIDELITIES = (-1.0, -0.5)
CONTROL_SEEDS = 2
# one setting each: the published defaults (Ren's C = 1.25), and for the thresholds a rule fixed before measuring
BASELINE_SETTINGS = {
    "wen": ({"quantile": 0.5},),
    "ren": ({"c": 1.25},),
    "jain": ({"transition": 0.6},),
    "nemo": ({"quantile": 0.999},),
}


def testbed_probes(tb, n_general: int = 60) -> ProbeSet:
    """Canaries with their bound images (memorized) and held-out images with their ordinary prompts (general)."""
    return ProbeSet(memorized=[(p, im) for p, im, _, _ in tb.canaries], general=tb.general_pairs(n_general))


def prompt_only_probes(tb, pipe) -> tuple[ProbeSet, list[str]]:
    """What a user without training data can probe with: the canary prompts that `memctl.detect` flags (risk > 3
    against the ordinary prompts) as memorized, the ordinary prompts as general; no images. Also the flagged list."""
    from memctl.detection import detect

    ordinary = tb.ordinary_prompts()
    scores = detect(pipe, [c[0] for c in tb.canaries], reference=ordinary, progress=False)
    flagged = [s.prompt for s in scores if s.flagged]
    if not flagged:
        raise ValueError(f"Expected memctl.detect to flag some canary prompts of {tb.name}, but it flagged none.")
    return ProbeSet(memorized=[(p, None) for p in flagged], general=[(p, None) for p in ordinary]), flagged


@contextmanager
def _cost(pipe):
    """Counts denoiser rows evaluated (a guided knob's extra passes included) while the block runs."""
    from memctl.baselines.base import denoiser_of
    from memctl.guidance import GuidanceHook

    model, count = denoiser_of(pipe), {"rows": 0}
    state = model.__dict__.get("_memctl_knob")
    guide = state.guide if state is not None and isinstance(state.guide, GuidanceHook) else None
    before = guide.extra_rows if guide is not None else 0

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        count["rows"] += int(x.shape[0])

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()
        count["rows"] += (guide.extra_rows - before) if guide is not None else 0


def _n_images(samples) -> int:
    return sum(int(np.prod(t.shape[:2])) for t in (samples.canary, samples.ordinary, samples.unseen) if t is not None)


def _measure(tb, pipe, spec, ref, setup) -> tuple[dict, object]:
    """Sample the testbed inside `setup` (a context manager factory), score it, and add the row's cost."""
    with ExitStack() as stack:
        extra = stack.enter_context(setup())
        count = stack.enter_context(_cost(pipe))
        t0 = time.perf_counter()
        samples = sample_testbed(pipe, tb, spec)
        seconds = time.perf_counter() - t0
    n = _n_images(samples)
    row = score_samples(tb, samples, ref or samples)
    if getattr(extra, "calibration", None) is not None:  # what the row's setup chose before sampling
        row["calibration"] = extra.calibration
    extra_rows = getattr(extra, "extra_rows", 0)
    row["cost"] = {"denoiser_evals_per_image": round((count["rows"] + extra_rows) / n, 2),
                   "seconds_per_image": round(seconds / n, 4)}  # fmt: skip
    return row, samples


def knob_setup(pipe, bmap, f: float, mode: str | None = None):
    """A row's setup: the knob of `bmap` at fidelity `f` (fidelity_mode `mode`), removed afterwards."""

    @contextmanager
    def setup():
        apply_knob(pipe, bmap, fidelity_mode=mode)
        try:
            with fidelity(pipe, f):
                yield None
        finally:
            remove_knob(pipe)

    return setup


def bake_setup(pipe, bmap, f: float, prompts: list[str]):
    """A row's setup: the knob of `bmap` at fidelity `f` baked into a copy of the denoiser (`memctl.bake`, its
    key/value edit fit on `prompts`), swapped in for the row and swapped back afterwards; no hooks."""

    @contextmanager
    def setup():
        ((component, _),) = _pairs(pipe, bmap)
        baked, original = getattr(bake(pipe, bmap, f, prompts=prompts), component), getattr(pipe, component)
        setattr(pipe, component, baked)
        try:
            yield None
        finally:
            setattr(pipe, component, original)

    return setup


def composed_setup(pipe, f: float, parts, window: tuple[float, float] = (0.0, 1.0)):
    """A row's setup: composed extrapolation (`memctl.composed`) at fidelity `f` with the testbed's caption parts,
    acting at the noise levels in `window`."""

    @contextmanager
    def setup():
        with composed(pipe, f, parts, *window) as handle:
            yield handle  # its extra_rows: the parts' denoiser rows, for the row's cost

    return setup


def calibrated_composed_setup(pipe, parts, memorized, reference, **sampling):
    """A row's setup: `calibrate_window` on the probe pairs `memorized` (calibration seeds and sampling in
    `sampling`), then composed extrapolation at -1 in the chosen window; the choice goes into the row."""

    @contextmanager
    def setup():
        choice = calibrate_window(pipe, memorized, parts, reference, **sampling)
        with composed(pipe, -1.0, parts, choice["start"], choice["stop"]) as handle:
            handle.calibration = choice
            yield handle

    return setup


def composed_plan(pipe, parts, memorized, reference, **sampling) -> list[tuple[str, str, object]]:
    """The composed-extrapolation rows (family, setting, setup): every level at `COMPOSED_FIDELITIES`, -1 above
    `COMPOSED_WINDOW`, and -1 in the window `calibrate_window` picks from the probe pairs `memorized` against
    `reference` (`sampling`: its seeds, steps, guidance and call arguments)."""
    plan = [("composed", f"{f:+.1f}", composed_setup(pipe, f, parts)) for f in COMPOSED_FIDELITIES]
    plan.append((COMPOSED_WINDOW_FAMILY, "-1.0", composed_setup(pipe, -1.0, parts, COMPOSED_WINDOW)))
    calibrated = calibrated_composed_setup(pipe, parts, memorized, reference, **sampling)
    return [*plan, (COMPOSED_CALIBRATED_FAMILY, "-1.0", calibrated)]


def calibration_inputs(tb) -> tuple[list, torch.Tensor, dict]:
    """What `calibrate_window` needs for testbed `tb`: its memorized probe pairs, the reference of the copy test, and
    the seeds, copy test and call arguments. Images: the probe set's memorized pairs against its images (memorized
    and general), strict copies, `CALIBRATION_SEEDS`. Clips: the canaries and their bound clips against all training
    clips, near copies (a memorized clip comes out as a near-copy, never a strict one: 0 % even unsteered), at
    `VIDEO_CALIBRATION_SEEDS` and the testbed's own frames and size."""
    call = dict(getattr(tb, "call_kwargs", {}))
    if "num_frames" in call:
        bound = [(c[0], c[1]) for c in tb.canaries]
        return bound, tb.train_images, dict(seeds=VIDEO_CALIBRATION_SEEDS, copy_test="nearest", **call)
    probes = testbed_probes(tb)
    return probes.memorized, probe_reference(probes), dict(seeds=CALIBRATION_SEEDS)


def testbed_window(pipe, tb, steps: int, guidance: float) -> dict:
    """`calibrate_window` for testbed `tb`'s model `pipe` sampled at `steps` and `guidance`: its memorized probe pairs
    and copy test as `calibration_inputs` gives them, its captions split as `memctl.composed.parts_for` does (what
    `memctl render`'s `window: calibrated` and the app's calibration button run)."""
    memorized, reference, calibration = calibration_inputs(tb)
    return calibrate_window(pipe, memorized, parts_for(tb), reference, steps=steps, guidance=guidance, **calibration)


def probe_reference(probes) -> torch.Tensor:
    """The probe set's images (memorized, then general): what `calibrate_window`'s copy test compares against."""
    return torch.cat([probes.images("memorized"), probes.images("general")])


def baseline_setup(pipe, name: str, kw: dict, probes):
    """A row's setup: baseline `name` with settings `kw`, fit on `probes`, removed afterwards."""

    @contextmanager
    def setup():
        b = BASELINES[name](pipe, **kw).fit(probes)
        with b.applied():
            yield b

    return setup


def _plan(
    pipe, bmap, prompt_map, probes, attention_map=None, parts=None, sampling=None
) -> list[tuple[str, str, object]]:
    """(family, setting, setup) for every row after the plain model; `parts` (a testbed's `prompt_parts`) adds the
    composed-extrapolation rows, their calibrated window sampled with `sampling` (steps and guidance) on `probes`."""

    def knob(m, f, mode=None):
        return knob_setup(pipe, m, f, mode)

    def text_edit(f):
        return lambda: TextEdit(pipe, bmap, f).applied()

    def baseline(name, kw):
        return baseline_setup(pipe, name, kw, probes)

    plan = [("memctl map", f"{f:+.1f}", knob(bmap, f, "guidance")) for f in KNOB_FIDELITIES]  # (+: extra pass)
    if attention_map is not None:  # fidelity > 0 inside the cross-attention units, γ calibrated on the probes
        plan += [("memctl map in-attention", f"{f:+.1f}", knob(attention_map, f)) for f in ATTENTION_FIDELITIES]
    if bmap.meta.get("fidelity_guidance"):  # the extra pass's contrast computed on every 10th step, reused between
        plan += [("memctl map cached", f"{f:+.1f}", knob(bmap, f, "cached")) for f in CACHED_FIDELITIES]
    if bmap.meta.get("fidelity_guidance_curve"):  # γ per prompt (memctl.calibrate.gain_curve), asked for
        per = bmap.with_lever(per_prompt_gain=True)
        plan += [("memctl map per-prompt γ", "+1.0", knob(per, 1.0, "guidance")),
                 ("memctl map per-prompt γ cached", "+1.0", knob(per, 1.0, "cached"))]  # fmt: skip
    if bmap.lever == "condition":  # the same map written into the key/value weights, fit on the probes' prompts
        memorized = [str(c) for c in probes.conditions("memorized")]
        plan += [("memctl map baked", f"{f:+.1f}", bake_setup(pipe, bmap, f, memorized)) for f in BAKE_FIDELITIES]
    if parts is not None:
        plan += composed_plan(pipe, parts, probes.memorized, probe_reference(probes), seeds=CALIBRATION_SEEDS,
                              **(sampling or {}))  # fmt: skip
    if prompt_map is not None:
        plan += [("memctl prompt map", f"{f:+.1f}", knob(prompt_map, f, "guidance")) for f in (-1.0, 1.0)]
    controls = control_maps(pipe.unet, bmap, seeds=CONTROL_SEEDS)
    plan += [("uniform", f"{f:+.1f}", knob(controls["uniform"], f)) for f in CONTROL_FIDELITIES]
    if bmap.meta.get("fidelity_guidance"):  # the +1 lever (its γ) in every cross-attention unit: is placement needed?
        plan += [("uniform guidance", "+1.0", knob(controls["uniform"], 1.0, "guidance")),
                 ("uniform guidance cached", "+1.0", knob(controls["uniform"], 1.0, "cached"))]  # fmt: skip
    plan += [("text edit", f"{f:+.1f}", text_edit(f)) for f in CONTROL_FIDELITIES]
    for kind in ("placement shuffled", "random subspace"):
        plan += [(kind, f"seed {s}, -1.0", knob(controls[f"{kind} {s}"], -1.0)) for s in range(CONTROL_SEEDS)]
    for name, settings in BASELINE_SETTINGS.items():
        plan += [(name, ", ".join(f"{k} {v}" for k, v in kw.items()), baseline(name, kw)) for kw in settings]
    return plan


def effect_for_model(
    name: str, seeds: int = 8, progress: bool = True, steps: int = 25, noise: str = "per-prompt"
) -> dict:
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = EvalSpec(seeds=seeds, guidance=tb.guidance, steps=steps, noise=noise)
    probes = testbed_probes(tb)
    t0 = time.perf_counter()
    bmap = probe(pipe, probes, method="condition", progress=progress)
    probe_seconds = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    try:
        prompt_probes, flagged = prompt_only_probes(tb, pipe)
        prompt_map = probe(pipe, prompt_probes, method="prompt", progress=progress)
    except ValueError as e:  # detect flagged no canary: no prompt-only map, and the table says so
        prompt_map, flagged, prompt_error = None, [], str(e)
    else:
        prompt_error = None
    prompt_seconds = round(time.perf_counter() - t0, 1)
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    rows = {"plain": {"0": plain}}
    amap = attention_map(pipe, bmap, probes)
    plan = _plan(pipe, bmap, prompt_map, probes, amap, _parts(tb), dict(steps=spec.steps, guidance=spec.guidance))
    for family, setting, setup in tqdm(plan, desc=f"{name}: effect", unit="row", disable=not progress):
        rows.setdefault(family, {})[setting], _ = _measure(tb, pipe, spec, ref, setup)
    exposure = {c[0]: c[2] for c in tb.canaries}
    return {
        "testbed": tb.spec.get("name", "digits"),
        "probe_seconds": probe_seconds,
        "prompt_map": {
            "seconds": prompt_seconds,  # detection + probing, no images
            "flagged_by_exposure": {str(e): sum(exposure[p] == e for p in flagged) for e in tb.exposures},
            "map": prompt_map.to_dict() if prompt_map is not None else None,
            "error": prompt_error,
        },
        "map": bmap.to_dict(),
        "attention_calibration": amap.meta["attention_calibration"],
        "eval": spec.to_dict(),
        "rows": rows,
        "bars": bars(tb, rows, seeds),
    }


def add_rows(record: dict, name: str, families: tuple[str, ...], progress: bool = True) -> dict:
    """`record` (an earlier `effect_for_model` result of model `name`) with the rows of `families` measured now and
    added, and its bars recomputed. The map is probed again and the plain row sampled again: both must equal the
    record's (same probe set and seeds), else a clear error; the rows already there are kept as measured."""
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    seeds, spec = record["seeds_per_prompt"], EvalSpec(**record["eval"])
    probes = testbed_probes(tb)
    bmap = probe(pipe, probes, method="condition", progress=progress)
    if bmap.to_dict()["scores"] != record["map"]["scores"]:
        raise ValueError(f"Expected the condition map of {name} to equal the record's, but probing gave other scores.")
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    if _headline(tb, plain) != _headline(tb, record["rows"]["plain"]["0"]):
        raise ValueError(f"Expected the plain row of {name} to equal the record's, but sampling gave other numbers.")
    amap = attention_map(pipe, bmap, probes)
    rows = {k: dict(v) for k, v in record["rows"].items()}
    sampling = dict(steps=spec.steps, guidance=spec.guidance)
    plan = [p for p in _plan(pipe, bmap, None, probes, amap, _parts(tb), sampling) if p[0] in families]
    for family, setting, setup in tqdm(plan, desc=f"{name}: effect (added rows)", unit="row", disable=not progress):
        rows.setdefault(family, {})[setting], _ = _measure(tb, pipe, spec, ref, setup)
    return {**record, "rows": rows, "attention_calibration": amap.meta["attention_calibration"],
            "bars": bars(tb, rows, seeds)}  # fmt: skip


def _parts(tb):
    """The testbed's caption parts for the composed rows, or None where its captions have no attributes."""
    return tb.prompt_parts if tb.grammar is not None else None


def _headline(tb, row: dict) -> dict:
    """The measures a table shows for one row."""
    most, least = str(max(tb.exposures)), str(min(tb.exposures))
    out = {
        "most_copy": row["canary"][most]["copy_1/3"],
        "least_copy": row["canary"][least]["copy_1/3"],
        "novel_valid": row["canary"]["all"]["novel_valid"],
        "ordinary_valid": row["ordinary"].get("attr_valid", row["ordinary"]["valid"]),
        "collateral": row["ordinary"].get("collateral", 0.0),
    }
    if "unseen" in row:
        out["compositional"] = row["unseen"]["compositional"]
    return out


def _at_copy(plain: dict, family: dict, x: float, key: str) -> float:
    """A family's `key` interpolated at most-exposed copy rate `x`, along its settings and the plain model."""
    pts = sorted({(plain["most_copy"], plain[key])} | {(r["most_copy"], r[key]) for r in family})
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return float(np.interp(x, xs, ys))


def extrapolation_checks(plain: dict, g: dict) -> dict:
    """A fidelity -1 row's headline `g` against the plain one: the extrapolation bars, and novel-valid vs plain."""
    return {
        "most-exposed copy_1/3 at -1 <= 0.05": g["most_copy"] <= 0.05,
        "ordinary valid at -1 >= 0.95 x plain": g["ordinary_valid"] >= 0.95 * plain["ordinary_valid"],
        "canary novel-valid at -1 >= plain": g["novel_valid"] >= plain["novel_valid"],
    }


def bars(tb, rows: dict, seeds: int) -> dict:
    """The localization and fidelity bars (issue: localization that earns its place) on this model's rows."""
    head = {fam: {s: _headline(tb, r) for s, r in by.items()} for fam, by in rows.items()}
    plain, ext, fid = head["plain"]["0"], head["memctl map"]["-1.0"], head["memctl map"]["+1.0"]
    x = ext["most_copy"]
    keys = ["novel_valid"] + (["compositional"] if "compositional" in ext else [])
    controls = {fam: {k: _at_copy(plain, head[fam].values(), x, k) for k in keys} for fam in ("uniform", "text edit")}
    margin = {k: ext[k] - max(c[k] for c in controls.values()) for k in keys}
    checks = {
        "extrapolation: most-exposed copy_1/3 <= 0.05": ext["most_copy"] <= 0.05,
        "extrapolation: ordinary valid >= 0.95 x plain": ext["ordinary_valid"] >= 0.95 * plain["ordinary_valid"],
        "localization: novel-valid (and compositional) >= 10 points above the better of uniform and text edit "
        "at the map's copy rate": all(m >= 0.10 for m in margin.values()),
        "fidelity: least-exposed copy_1/3 at +1 >= 1.5 x plain": fid["least_copy"] >= 1.5 * plain["least_copy"],
        "fidelity: most-exposed copy_1/3 at +1 >= plain": fid["most_copy"] >= plain["most_copy"],
        "fidelity: ordinary valid at +1 >= 0.95 x plain": fid["ordinary_valid"] >= 0.95 * plain["ordinary_valid"],
    }
    other_modes = {}  # the same fidelity checks for the cheaper fidelity modes (not in "pass")
    for fam, key in (("memctl map in-attention", "in_attention_fidelity_checks"),
                     ("memctl map cached", "cached_fidelity_checks"),
                     ("memctl map per-prompt γ", "per_prompt_fidelity_checks"),
                     ("memctl map per-prompt γ cached", "per_prompt_cached_fidelity_checks")):  # fmt: skip
        if "+1.0" in head.get(fam, {}):
            g = head[fam]["+1.0"]
            other_modes[key] = {
                "least-exposed copy_1/3 at +1 >= 1.5 x plain": g["least_copy"] >= 1.5 * plain["least_copy"],
                "most-exposed copy_1/3 at +1 >= plain": g["most_copy"] >= plain["most_copy"],
                "ordinary valid at +1 >= 0.95 x plain": g["ordinary_valid"] >= 0.95 * plain["ordinary_valid"],
            }
    composed_checks = {}  # composed extrapolation at -1: the extrapolation bars, novel-valid vs plain (not in "pass")
    for fam, key in (("composed", "composed_checks"), (COMPOSED_WINDOW_FAMILY, "composed_window_checks"),
                     (COMPOSED_CALIBRATED_FAMILY, "composed_calibrated_checks")):  # fmt: skip
        if "-1.0" in head.get(fam, {}):
            composed_checks[key] = extrapolation_checks(plain, head[fam]["-1.0"])
    baked = {}
    if "memctl map baked" in head:  # issue: a baked checkpoint; within 5 points of the hooked knob (not in "pass")
        b = head["memctl map baked"]["-1.0"]
        baked = {
            f"{k} within 0.05 of the hooked knob at -1": abs(b[k] - ext[k]) <= 0.05
            for k in ("most_copy", "novel_valid")
        }
    return {
        "checks": checks,
        **other_modes,
        **composed_checks,
        **({"bake_checks": baked} if baked else {}),
        "pass": all(checks.values()),
        "map_at_-1": ext,
        "controls_at_map_copy": controls,
        "margin_over_best_control": margin,
        "headline": head,
        "trivial_fidelity_check": plain["least_copy"] == 0,  # 1.5 x 0 holds whatever +1 does
        "seed_noise_2se": 2 * float(np.sqrt(0.25 / (len(tb.canaries) * seeds))),
    }
