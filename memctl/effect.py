"""`memctl bench effect`: what the knob does in samples, against controls and mitigation baselines.

For each embedded model: probe a block map (method "condition") from its canaries and held-out digits, and a
prompt-only map (method "prompt") from the canary prompts `memctl.detect` flags and the ordinary prompts, then sample
every canary and ordinary prompt at evaluation seeds for both maps at fidelity -1 … +1, for shuffled control maps,
uniform residual scaling, noise on the prompt's text embedding and a random token added to the prompt (Somepalli
et al. 2023), and lower guidance. Selectivity compares canary novel-valid rates at equal ordinary collateral.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from memctl.blockmap import BlockMap
from memctl.blocks import find_blocks
from memctl.evaluate import EvalSpec, sample_testbed, score_samples
from memctl.knob import apply_knob, fidelity, remove_knob
from memctl.probe import probe
from memctl.probeset import ProbeSet

FIDELITIES = (-1.0, -0.5, 0.0, 0.5, 1.0)
CONTROL_FIDELITIES = (-1.0, -0.5)


def testbed_probes(tb, n_general: int = 60) -> ProbeSet:
    """Canaries with their bound images (memorized) and held-out digits with their ordinary prompts (general)."""
    images, classes = tb.held_out
    general = [(tb.prompt(int(c)), im) for im, c in zip(images[:n_general], classes[:n_general], strict=False)]
    return ProbeSet(memorized=[(p, im) for p, im, _, _ in tb.canaries], general=general)


class _TextNoise:
    """Baseline: Gaussian noise (σ × the embedding's std) added to the prompt's text states, per call."""

    def __init__(self, pipe, sigma: float, seed: int = 0):
        self.pipe, self.sigma, self.gen, self.orig = pipe, sigma, torch.Generator().manual_seed(seed), None

    def __enter__(self):
        self.orig = self.pipe.encode_prompt

        def noisy(prompts):
            states = self.orig(prompts)
            keep = torch.tensor([p == "" for p in prompts])[:, None, None]
            noise = torch.randn(states.shape, generator=self.gen) * states.std() * self.sigma
            return torch.where(keep, states, states + noise)

        self.pipe.encode_prompt = noisy
        return self

    def __exit__(self, *exc):
        self.pipe.encode_prompt = self.orig


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


def _random_token_prompts(seed: int = 0):
    rng = random.Random(seed)
    words = ["ship", "tree", "blue", "cat", "road", "lamp", "cold", "star", "milk", "ring"]
    return lambda p: f"{p} {rng.choice(words)}"


def _row(tb, pipe, spec, ref, **kw) -> dict:
    return score_samples(tb, sample_testbed(pipe, tb, spec, **kw), ref)


def _novel_valid_at(base: dict, family_rows, x: float) -> float:
    """A family's canary novel-valid rate interpolated at collateral `x`, along its settings and fidelity 0."""
    pts = sorted(
        [(0.0, base["canary"]["all"]["novel_valid"])]
        + [(r["ordinary"]["collateral"], r["canary"]["all"]["novel_valid"]) for r in family_rows]
    )
    return float(np.interp(x, [p[0] for p in pts], [p[1] for p in pts]))


def effect_for_model(name: str, seeds: int = 8, n_controls: int = 5, progress: bool = True) -> dict:
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    spec = EvalSpec(seeds=seeds, guidance=tb.guidance)
    t0 = time.perf_counter()
    bmap = probe(pipe, testbed_probes(tb), method="condition", progress=progress)
    probe_seconds = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    prompt_probes, flagged = prompt_only_probes(tb, pipe)
    prompt_map = probe(pipe, prompt_probes, method="prompt", progress=progress)
    prompt_seconds = round(time.perf_counter() - t0, 1)
    ref = sample_testbed(pipe, tb, spec)
    jobs = [("map", f, {"map": bmap}) for f in FIDELITIES if f != 0.0]
    jobs += [("prompt map", f, {"map": prompt_map}) for f in FIDELITIES if f != 0.0]
    jobs += [(f"control {i}", f, {"map": bmap.shuffled(i)}) for i in range(n_controls) for f in CONTROL_FIDELITIES]
    units = find_blocks(pipe.unet)
    uniform = BlockMap.from_scores(pipe.unet, {b.name: 1.0 for b in units}, method="uniform")
    jobs += [("uniform", f, {"map": uniform}) for f in (-0.1, -0.25, -0.5)]
    jobs += [("text-noise", s, {"noise": s}) for s in (0.5, 1.0, 2.0)]
    jobs += [("random-token", 1.0, {"token": True})]
    jobs += [("guidance", g, {"guidance": g}) for g in (0.5, 0.0)]
    rows: dict[str, dict] = {"map": {"0.0": score_samples(tb, ref, ref)}}
    for family, x, job in tqdm(jobs, desc=f"{name}: effect", unit="setting", disable=not progress):
        if "map" in job:
            apply_knob(pipe, job["map"])
            with fidelity(pipe, x):
                row = _row(tb, pipe, spec, ref)
            remove_knob(pipe)
        elif "noise" in job:
            with _TextNoise(pipe, x):
                row = _row(tb, pipe, spec, ref)
        elif "token" in job:
            row = _row(tb, _PromptEdit(pipe, _random_token_prompts()), spec, ref)
        else:
            row = _row(tb, pipe, EvalSpec(seeds=seeds, guidance=x), ref)
        rows.setdefault(family, {})[str(x)] = row
    exposure = {c[0]: c[2] for c in tb.canaries}
    return {
        "probe_seconds": probe_seconds,
        "prompt_map": {
            "seconds": prompt_seconds,  # detection + probing, no images
            "flagged_by_exposure": {str(e): sum(exposure[p] == e for p in flagged) for e in tb.exposures},
            "map": prompt_map.to_dict(),
        },
        "map": bmap.to_dict(),
        "rows": rows,
        "bars": _bars(tb, rows, n_controls, seeds),
    }


class _PromptEdit:
    """A pipeline view whose prompts (not the empty negative) pass through `edit` first."""

    def __init__(self, pipe, edit):
        self.pipe, self.edit = pipe, edit

    def __call__(self, prompt, **kw):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        return self.pipe([self.edit(p) for p in prompts], **kw)


def _bars(tb, rows: dict, n_controls: int, seeds: int) -> dict:
    most, least = str(max(tb.exposures)), str(min(tb.exposures))
    base, ext, fid = rows["map"]["0.0"], rows["map"]["-1.0"], rows["map"]["1.0"]
    x = ext["ordinary"]["collateral"]
    controls = [_novel_valid_at(base, rows[f"control {i}"].values(), x) for i in range(n_controls)]
    median_control = float(np.median(controls))
    others = {}
    for fam in ("uniform", "text-noise", "random-token", "guidance"):
        others[fam] = {
            "at_equal_collateral": _novel_valid_at(base, rows[fam].values(), x),
            "best_novel_valid": max(r["canary"]["all"]["novel_valid"] for r in rows[fam].values()),
        }
    copy = [rows["map"][str(f)]["canary"]["all"]["copy_1/3"] for f in sorted(FIDELITIES, reverse=True)]
    n = len(tb.canaries) * seeds
    noise = 2 * float(np.sqrt(0.25 / n))  # two binomial standard errors at p = 1/2
    nv = ext["canary"]["all"]["novel_valid"]
    checks = {
        "extrapolation: most-exposed copy_1/3 <= 0.05": ext["canary"][most]["copy_1/3"] <= 0.05,
        "extrapolation: canary novel_valid >= 0.60": nv >= 0.60,
        "extrapolation: ordinary valid >= 0.95 x fidelity-0": ext["ordinary"]["valid"]
        >= 0.95 * base["ordinary"]["valid"],
        "extrapolation: ordinary collateral <= 0.25": x <= 0.25,
        "selectivity: novel_valid >= 2 x median control at equal collateral": nv >= 2 * median_control,
        "selectivity: beats uniform and both baselines at equal collateral": all(
            nv > o["at_equal_collateral"] for o in others.values()
        ),
        "fidelity: least-exposed copy_1/3 >= 1.5 x fidelity-0": fid["canary"][least]["copy_1/3"]
        >= 1.5 * base["canary"][least]["copy_1/3"],
        "fidelity: ordinary valid >= 0.95 x fidelity-0": fid["ordinary"]["valid"] >= 0.95 * base["ordinary"]["valid"],
        "monotone: canary copy does not rise from +1 to -1 (beyond 2 SE)": all(
            b <= a + noise for a, b in zip(copy, copy[1:], strict=False)
        ),
    }
    return {
        "checks": checks,
        "pass": all(checks.values()),
        "equal_collateral": x,
        "median_control_novel_valid": median_control,
        "controls_novel_valid": controls,
        "baselines": others,
        "copy_by_fidelity_+1_to_-1": copy,
        "seed_noise_2se": noise,
        "most_exposed_bound_copy_at_-1": ext["canary"][most]["copy_bound_1/3"],
        "least_exposed_copy_1/2_at_0_and_+1": [base["canary"][least]["copy_1/2"], fid["canary"][least]["copy_1/2"]],
        "least_exposed_copy_1/3_at_0_and_+1": [base["canary"][least]["copy_1/3"], fid["canary"][least]["copy_1/3"]],
    }
