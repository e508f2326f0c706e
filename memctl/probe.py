"""Probing: attribute to every block how much the fit to memorized vs general probes depends on it → a BlockMap.

>>> import memctl
>>> tb = memctl.zoo.load_testbed("digits")
>>> probes = memctl.ProbeSet(memorized=[(p, im) for p, im, _, _ in tb.canaries[:4]],
...                          general=[(tb.prompt(int(c)), im) for im, c in zip(*tb.held_out)][:8])
>>> bmap = memctl.probe(tb.pipeline(), probes, method="ablation", noise_levels=(0.5,), progress=False)
>>> len(bmap.names) > 10
True

Methods:
- `"ablation"`: zero one residual unit at a time (`out = shortcut`), at each noise level, and compare the rise of
  the denoising loss on memorized probes with the rise on general probes. The reference method.
- `"condition"`: find the directions of the conditioning (text-state) space that memorized prompts use and general
  prompts do not (a generalized eigenproblem of their second moments, `memctl.subspace`), then attribute to every
  cross-attention unit the loss change when the tokens heavy in those directions are pulled toward the nearest
  general conditioning in that unit alone. The knob pulls them (fidelity < 0) in the units the map selects, and
  for fidelity > 0 guides toward what they add (`memctl.guidance`, an extra pass on every 10th step). The CLI's
  default. In samples it beats random-subspace controls but not the same lever applied uniformly or once to the text
  states (`bench/results/effect.md`): the lever works where memorized prompts carry unusual tokens; the selection
  adds nothing measurable.
- `"prompt"`: prompts only, no images (text-conditional models). The same conditioning lever as `"condition"`, fit
  from the prompts' text states; every cross-attention unit is scored by how much replacing memorized tokens there
  lowers the memorization signal of `memctl.detect` (the magnitude of the text-conditional noise prediction in the
  first guided steps, Wen et al. 2024) on memorized prompts more than on general ones. A user with a list of
  prompts can flag the memorized ones with `memctl.detect` first. Where no UNet cross-attends to the prompt
  encoding (SD3, Flux, CogVideoX, Wan, DiT with class labels as conditions) the signal scores the residual lever:
  one unit of every denoiser zeroed at a time (a map per denoiser, combined).
Scores are signed: positive = memorization-heavy (removal hurts memorized probes more), negative =
generalization-heavy. Probe noise comes from `seed` (below 10,000; evaluations use seeds from 10,000 up).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from memctl.blocks import find_blocks, pipeline_denoisers
from memctl.calibrate import fidelity_gain
from memctl.experts import qualified
from memctl.guidance import DEFAULT_GAIN
from memctl.hooks import ConditionHook, attached, cross_attentions, scaled
from memctl.joint import joint_denoiser, joint_tensors, lever_paths, unit_tensors
from memctl.probeset import ProbeSet, default_method
from memctl.quiet import quiet
from memctl.subspace import fit_subspace, trim_bank, weight_threshold
from memctl.text_states import WAN_TOKENS, text_states  # noqa: F401  (public here too)

NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Condition lever. Fidelity > 0: no push on the tokens (it did not raise recall, see memctl.guidance) but guidance
# toward the memorized component at one extra pass per step. Fidelity < 0: memorized tokens pulled to the nearest
# general conditioning and, in the most selective units, past it (up to twice the way): without the overshoot the
# most-exposed canaries still copied their digit's duplicated training images as often as the plain prompt does.
LEVER_META = {"positive_gain": 0.0, "fidelity_guidance": DEFAULT_GAIN, "pull_max": 2.0}


@dataclass
class _Batch:
    """Fixed probe inputs at one noise level: noisy images, noise, timesteps and text states."""

    xt: torch.Tensor  # (N, C, H, W)
    noise: torch.Tensor  # (N, C, H, W)
    t: torch.Tensor  # (N,)
    cond: torch.Tensor  # (N, L, D)
    n_mem: int


def _denoiser(pipe):
    found = pipeline_denoisers(pipe)
    if found:
        return next(iter(found.values()))
    raise ValueError(f"Expected a pipeline with a `unet` or `transformer`, but got {type(pipe).__name__}.")


def _encode_conditions(pipe, conds: list) -> torch.Tensor:
    if not all(isinstance(c, str) for c in conds):
        raise ValueError(
            "Expected prompt (str) conditions for this pipeline, but got class labels; "
            "class-conditional probing needs a class-conditional pipeline."
        )
    if not hasattr(pipe, "encode_prompt") or getattr(pipe, "vae", None) is not None:
        raise ValueError(
            f"Expected a pixel-space text-to-image pipeline (memctl.PixelPipeline) for image probes, "
            f"but got {type(pipe).__name__}; use method='prompt' for latent pipelines."
        )
    return pipe.encode_prompt(conds)


def _make_batches(pipe, probes: ProbeSet, levels, seed: int, repeats: int) -> list[_Batch]:
    """Memorized then general probes, each repeated `repeats` times with its own fixed noise, per noise level."""
    denoiser = _denoiser(pipe)
    x0 = torch.cat([probes.images("memorized"), probes.images("general")]) * 2 - 1  # (N, C, H, W) in [-1, 1]
    expected = (denoiser.config.in_channels, denoiser.config.sample_size, denoiser.config.sample_size)
    if tuple(x0.shape[1:]) != expected:
        raise ValueError(f"Expected probe images of shape {expected} for this model, but got {tuple(x0.shape[1:])}.")
    conds = probes.conditions("memorized") + probes.conditions("general")
    with torch.no_grad():
        cond = _encode_conditions(pipe, conds)
    x0, cond = x0.repeat(repeats, 1, 1, 1), cond.repeat(repeats, 1, 1)
    n_mem = len(probes.memorized)
    order = torch.cat(
        [torch.arange(n_mem) + r * len(conds) for r in range(repeats)]
        + [torch.arange(n_mem, len(conds)) + r * len(conds) for r in range(repeats)]
    )
    x0, cond = x0[order], cond[order]
    gen = torch.Generator().manual_seed(seed)
    n_train = pipe.scheduler.config.num_train_timesteps
    batches = []
    for level in levels:
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.full((len(x0),), min(n_train - 1, round(level * n_train)), dtype=torch.long)
        batches.append(_Batch(pipe.scheduler.add_noise(x0, noise, t), noise, t, cond, n_mem * repeats))
    return batches


@torch.no_grad()
def _losses(denoiser, b: _Batch, chunk: int = 256) -> tuple[float, float]:
    """Mean ε-prediction loss on the memorized and on the general probes of one batch."""
    errs = []
    for i in range(0, len(b.xt), chunk):
        s = slice(i, i + chunk)
        eps = denoiser(b.xt[s], b.t[s], encoder_hidden_states=b.cond[s]).sample
        errs.append((eps - b.noise[s]).pow(2).flatten(1).mean(1))
    err = torch.cat(errs)
    return err[: b.n_mem].mean().item(), err[b.n_mem :].mean().item()


def _selectivity(base: tuple[float, float], hit: tuple[float, float]) -> float:
    """Loss rise on memorized minus loss rise on general probes, in units of the general probes' loss.

    Absolute rises, not relative ones: a memorized probe's loss is near zero, so any damage looks huge relative
    to it, and a block that hurts everything would pass for memorization-heavy.
    """
    return ((hit[0] - base[0]) - (hit[1] - base[1])) / base[1]


def attribute_ablation(
    pipe,
    probes: ProbeSet,
    levels=NOISE_LEVELS,
    granularity: str = "unit",
    seed: int = 0,
    repeats: int = 2,
    progress: bool = True,
) -> tuple[list, torch.Tensor, dict]:
    """Per-block selectivity scores `(n_blocks, n_levels)` by zeroing one residual update at a time."""
    denoiser = _denoiser(pipe)
    blocks = find_blocks(denoiser, granularity=granularity)
    batches = _make_batches(pipe, probes, levels, seed, repeats)
    scores = torch.zeros(len(blocks), len(levels))
    base = [_losses(denoiser, b) for b in batches]
    with scaled(denoiser, blocks, 1.0) as scales:
        for i, block in enumerate(tqdm(blocks, desc="probing (ablation)", unit="block", disable=not progress)):
            scales.set(block, 0.0)
            for j, b in enumerate(batches):
                scores[i, j] = _selectivity(base[j], _losses(denoiser, b))
            scales.set(block, 1.0)
    return blocks, scores, {"base_loss": {str(lv): list(bl) for lv, bl in zip(levels, base, strict=False)}}


def condition_tensors(pipe, probes: ProbeSet, k: int = 8, encode=None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The condition lever's tensors: memorized directions `read`, threshold `tau`, general `bank`, whitening."""
    encode = encode or _encode_conditions
    general = list(dict.fromkeys(probes.conditions("general") + [""]))
    with torch.no_grad():
        mem = encode(pipe, list(dict.fromkeys(probes.conditions("memorized")))).float()  # (M, L, D)
        bank = encode(pipe, general).float()  # (P, L, D)
    sub = fit_subspace(mem, bank, k=min(k, bank.shape[-1]))
    tensors = {
        "read": sub.read,
        "tau": weight_threshold(bank, sub.read),
        "bank": trim_bank(bank.float()),  # a constant padding tail kept as one token (exact: nearest_general)
        "g_inv_half": sub.g_inv_half,
    }
    return tensors, [round(x, 2) for x in sub.ratios.tolist()]


def attribute_condition(
    pipe, probes: ProbeSet, levels=NOISE_LEVELS, seed: int = 0, repeats: int = 2, k: int = 8, progress: bool = True
) -> tuple[list, torch.Tensor, dict, dict]:
    """Per-unit selectivity `(n_blocks, n_levels)` of the condition lever: memorized conditioning tokens replaced
    in one unit's cross-attention at a time. Units without cross-attention carry no such lever and score 0."""
    denoiser = _denoiser(pipe)
    blocks = find_blocks(denoiser, granularity="unit")
    tensors, ratios = condition_tensors(pipe, probes, k)
    batches = _make_batches(pipe, probes, levels, seed, repeats)
    base = [_losses(denoiser, b) for b in batches]
    scores = _condition_scores(
        denoiser, blocks, tensors, "condition", progress,
        lambda: [_selectivity(base[j], _losses(denoiser, b)) for j, b in enumerate(batches)],
    )  # fmt: skip
    knob_scale = _knob_scale(scores)
    gain, calibration = fidelity_gain(denoiser, blocks, tensors, scores, batches, knob_scale)
    extra = {
        "base_loss": {str(lv): list(bl) for lv, bl in zip(levels, base, strict=False)},
        "subspace_ratios": ratios,
        **LEVER_META,
        "fidelity_guidance": gain,  # calibrated on the probe batches (memctl.calibrate)
        "fidelity_calibration": calibration,
        "fidelity_guidance_curve": calibration.get("curve"),  # γ per prompt by its pull size (memctl.calibrate)
        "knob_scale": knob_scale,
    }
    return blocks, scores, extra, tensors


def _condition_scores(denoiser, blocks, tensors, method: str, progress: bool, measure) -> torch.Tensor:
    """`(n_blocks, n_levels)`: `measure()` (one score per level) with the memorized tokens replaced in one unit's
    cross-attention at a time. Units without cross-attention carry no such lever and score 0."""
    units = [(i, paths) for i, b in enumerate(blocks) if (paths := lever_paths(denoiser, b))]
    if not units:
        raise ValueError(
            f"Expected a denoiser with cross-attention for method {method!r}, but "
            f"{type(denoiser).__name__} has none; use method='ablation'."
        )
    rows = {}
    for i, paths in tqdm(units, desc=f"probing ({method})", unit="block", disable=not progress):
        hooks = {p: ConditionHook("memctl.probe", unit_tensors(tensors, p), 0.0) for p in paths}
        with attached(denoiser, hooks, "memctl.probe"):
            rows[i] = measure()
    scores = torch.zeros(len(blocks), len(next(iter(rows.values()))))
    for i, row in rows.items():
        scores[i] = torch.tensor(row)
    return scores


def _knob_scale(scores: torch.Tensor) -> float:
    """Fidelity -1 at strength 1 fully replaces memorized tokens in every unit at least median-selective."""
    positive = scores[scores > 0]
    return float(positive.median()) if len(positive) else 1.0


def _reads_text_states(pipe, probes: ProbeSet) -> bool:
    """Can the condition lever be fit from `pipe`'s prompt encoding (a UNet cross-attending to it)?"""
    conds = probes.conditions("memorized") + probes.conditions("general")
    if not all(isinstance(c, str) for c in conds):
        return False
    try:
        text_states(pipe, conds[:1])
    except ValueError:
        return False
    found = pipeline_denoisers(pipe)  # Wan 2.2: two experts, each with its own tensors (memctl.experts)
    return all(any(cross_attentions(d, b) for b in find_blocks(d)) for d in found.values())


def attribute_prompt(
    pipe,
    probes: ProbeSet,
    seed: int = 0,
    seeds: int = 4,
    steps: int = 1,
    guidance_scale: float = 7.5,
    k: int = 8,
    progress: bool = True,
    **call_kwargs,
) -> tuple[list[tuple[str, torch.nn.Module, list, torch.Tensor]], dict, dict, str]:
    """Per-unit selectivity `(n_blocks, 1)` on the prompt-only memorization signal, per denoiser.

    The condition lever, memorized tokens pulled in one unit at a time: in the cross-attention of PixelPipeline, SD,
    SDXL, AnimateDiff, Wan 2.1, and Wan 2.2's two experts (fitted per expert, `memctl.experts`); entering each joint
    block of SD3, Flux, CogVideoX (`memctl.joint`, fitted per block). Else (class labels): the residual lever, one
    unit of every denoiser zeroed at a time. Returns `(parts, extra, tensors, lever)`, `parts` =
    `[(component, denoiser, blocks, scores)]`."""
    from memctl.detection import condition_argument, signals

    mem, gen = probes.conditions("memorized"), probes.conditions("general")
    condition_argument(pipe, mem + gen)  # prompts for text models, class labels for class-conditional ones
    kw = dict(seeds=list(range(seed, seed + seeds)), steps=steps, guidance_scale=guidance_scale, progress=False)

    def signal() -> tuple[float, float]:
        m = signals(pipe, mem + gen, **kw, **call_kwargs)[0]
        return m[: len(mem)].mean().item(), m[len(mem) :].mean().item()

    def selectivity() -> float:  # the signal *drops*: the loss-rise selectivity with its sign turned
        return -_selectivity(base, signal())

    base = signal()
    extra: dict = {
        "base_signal": {"memorized": base[0], "general": base[1]},
        "signal": {"seeds": kw["seeds"], "steps": steps, "guidance_scale": guidance_scale},
    }
    joint = joint_denoiser(pipe, mem + gen)
    if joint is not None:  # SD3, Flux, CogVideoX: the text stream entering each block (memctl.joint)
        component, denoiser = joint
        blocks = find_blocks(denoiser, granularity="unit")
        tensors, ratios = joint_tensors(pipe, denoiser, blocks, probes, k, seed, **call_kwargs)
        fitted = [(component, denoiser, blocks, tensors)]
    elif not _reads_text_states(pipe, probes):
        parts = []
        for component, module in pipeline_denoisers(pipe).items():
            blocks = find_blocks(module, granularity="unit")
            scores = torch.zeros(len(blocks), 1)
            desc = f"probing (prompt, {component})"
            for i, block in enumerate(tqdm(blocks, desc=desc, unit="block", disable=not progress)):
                with scaled(module, [block], 0.0):
                    scores[i, 0] = selectivity()
            parts.append((component, module, blocks, scores))
        return parts, extra, {}, "residual"
    else:  # cross-attention, per denoiser (Wan 2.2's second expert under names of its own: memctl.experts)
        fitted, tensors, ratios = [], {}, []
        for i, (component, denoiser) in enumerate(pipeline_denoisers(pipe).items()):
            encode = functools.partial(text_states, component=component)
            own, own_ratios = condition_tensors(pipe, probes, k, encode=encode)
            tensors.update(own if i == 0 else qualified(own, component))
            ratios = ratios or own_ratios
            fitted.append((component, denoiser, find_blocks(denoiser, granularity="unit"), own))
    parts = [
        (c, d, b, _condition_scores(d, b, t, "prompt", progress, lambda: [selectivity()])) for c, d, b, t in fitted
    ]
    extra.update(subspace_ratios=ratios, **LEVER_META, knob_scale=_knob_scale(torch.cat([p[3] for p in parts])))
    return parts, extra, tensors, "condition"


def probe(
    pipe,
    probes: ProbeSet,
    method: str | None = None,
    noise_levels=NOISE_LEVELS,
    granularity: str = "unit",
    seed: int = 0,
    progress: bool = True,
    call_kwargs: dict | None = None,
):
    """Attribute memorization vs generalization to the blocks of `pipe`'s denoiser; returns a `BlockMap`.

    `method` None (default): the best measured lever, `memctl.probeset.default_method`. `noise_levels` (methods
    "ablation" and "condition"): the noise levels the probes are scored at; method "prompt" takes none.
    `call_kwargs` (method "prompt" only): extra arguments of the pipeline calls that read the signal, e.g.
    `{"height": 512, "width": 512}` or `{"num_frames": 16}`."""
    from memctl.blockmap import BlockMap

    if not isinstance(probes, ProbeSet):
        raise ValueError(f"Expected a memctl.ProbeSet, but got {type(probes).__name__}.")
    method = default_method(pipe, probes, granularity) if method is None else method
    if not 0 <= seed < 10_000:
        raise ValueError(f"Expected a probe seed in [0, 10000) (evaluation seeds start at 10000), but got {seed}.")
    if call_kwargs and method != "prompt":
        raise ValueError(f"Expected call_kwargs only with method 'prompt', but got method {method!r}.")
    if method == "prompt" and tuple(noise_levels) != NOISE_LEVELS:
        raise ValueError(
            f"Expected no noise_levels with method 'prompt' (it samples from pure noise), but got {noise_levels!r}; "
            "drop the argument, or use method 'ablation' or 'condition'."
        )
    t0 = time.perf_counter()
    lever, tensors = "residual", {}
    with quiet(pipe):  # memctl's own loops: no progress bar per pipeline call, no repeated warnings
        if method == "ablation":
            args = (pipe, probes, noise_levels, granularity, seed)
            blocks, scores, extra = attribute_ablation(*args, progress=progress)
        elif method == "condition":
            if granularity != "unit":
                raise ValueError(f"Expected granularity 'unit' for method 'condition', but got {granularity!r}.")
            blocks, scores, extra, tensors = attribute_condition(pipe, probes, noise_levels, seed, progress=progress)
            lever = "condition"
        elif method == "prompt":
            if granularity != "unit":
                raise ValueError(f"Expected granularity 'unit' for method 'prompt', but got {granularity!r}.")
            if not 0 <= seed <= 10_000 - 4:
                raise ValueError(
                    f"Expected a probe seed in [0, 9996] (method 'prompt' uses 4 seeds from it), got {seed}."
                )
            kw = call_kwargs or {}
            parts, extra, tensors, lever = attribute_prompt(pipe, probes, seed, progress=progress, **kw)
            noise_levels = (1.0,)
        else:
            raise ValueError(f"Expected method 'ablation', 'condition' or 'prompt', but got {method!r}.")
    if method != "prompt":
        component, denoiser = next(iter(pipeline_denoisers(pipe).items()))
        parts = [(component, denoiser, blocks, scores)]
    meta = {"probes": probes.summary(), "seed": seed, "seconds": round(time.perf_counter() - t0, 1), **extra}
    maps = [
        BlockMap.from_scores(
            module,
            {b.name: scores[i].tolist() for i, b in enumerate(blocks)},
            levels=list(noise_levels),
            method=method,
            meta=meta,
            component=component,
        )
        for component, module, blocks, scores in parts
    ]
    bmap = maps[0] if len(maps) == 1 else BlockMap.combine(*maps)
    bmap.lever, bmap.lever_tensors = lever, tensors
    bmap.__post_init__()
    return bmap
