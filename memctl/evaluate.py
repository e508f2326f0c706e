"""Sample a testbed and measure it: canary copies by exposure, novel-valid answers, ordinary validity, collateral.

>>> from memctl.zoo import load_testbed
>>> tb = load_testbed("digits")
>>> samples = sample_testbed(tb.pipeline(), tb, EvalSpec(seeds=1, steps=4))
>>> sorted(score_samples(tb, samples))[:3]
['canary', 'ordinary', 'settings']

Evaluation seeds start at `EvalSpec.seed_base` (10,000 by default), far from the seeds probes use (below 10,000),
so a block map is never scored on the noise it was made from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from memctl import metrics

# per canary exposure; nearest_bound: the sample's nearest training image is the canary's bound one (copy or not)
CANARY_MEASURES = ("copy_1/3", "copy_1/2", "copy_bound_1/3", "nearest_bound", "novel_valid", "valid", "diversity")


@dataclass(frozen=True)
class EvalSpec:
    """How a testbed is sampled for a measurement."""

    seeds: int = 8
    seed_base: int = 10_000
    steps: int = 25
    guidance: float = 1.0
    batch_size: int = 256
    # "shared": every prompt's sample s starts from seed `seed_base + s` (the same noises for all prompts: rows are
    # paired, but a row's level rests on `seeds` noise draws); "per-prompt": prompt i's from `seed_base + i * seeds +
    # s`, distinct noises (still paired across rows)
    noise: str = "shared"

    def __post_init__(self):
        if self.noise not in ("shared", "per-prompt"):
            raise ValueError(f"Expected noise 'shared' or 'per-prompt', but got {self.noise!r}.")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["noise"] == "shared":  # records made before the field existed compare equal
            del d["noise"]
        return d


@dataclass
class Samples:
    """Images `(…, C, H, W)`, or clips `(…, F, C, H, W)` for a video testbed."""

    canary: torch.Tensor  # (K, S, C, H, W): K canaries × S seeds
    ordinary: torch.Tensor  # (P, S, C, H, W): P = len(tb.eval_prompts())
    spec: EvalSpec
    unseen: torch.Tensor | None = None  # (U, S, C, H, W): never-shown combinations (testbeds with attributes)


def generate(pipe, prompts: list[str], seeds: list[int], spec: EvalSpec, **call_kwargs) -> torch.Tensor:
    """`(len(prompts), C, H, W)` in [0, 1] (clips `(len(prompts), F, C, H, W)` from a video pipeline); sample i
    comes from `torch.Generator().manual_seed(seeds[i])` alone."""
    out = []
    for i in range(0, len(prompts), spec.batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + spec.batch_size]]
        result = pipe(
            prompts[i : i + spec.batch_size],
            generator=gens,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            output_type="pt",
            **call_kwargs,
        )
        out.append((result.frames if hasattr(result, "frames") else result.images).cpu())
    return torch.cat(out)


def sample_testbed(pipe, tb, spec: EvalSpec = EvalSpec(), **call_kwargs) -> Samples:
    """Every canary prompt, the testbed's ordinary evaluation prompts and its never-shown combinations' prompts,
    each at `spec.seeds` evaluation seeds."""
    call_kwargs = {**getattr(tb, "call_kwargs", {}), **call_kwargs}  # a video testbed's frames and size
    groups = [[c[0] for c in tb.canaries], [p for p, _ in tb.eval_prompts()], tb.unseen_prompts()]
    prompts = [p for group in groups for p in group for _ in range(spec.seeds)]
    per = spec.noise == "per-prompt"  # sample k = (prompt k // seeds, seed k % seeds)
    seeds = [spec.seed_base + (k if per else k % spec.seeds) for k in range(len(prompts))]
    images = generate(pipe, prompts, seeds, spec, **call_kwargs)
    images = images.reshape(-1, spec.seeds, *images.shape[1:])  # (P, S, C, H, W)
    a, b = len(groups[0]), len(groups[0]) + len(groups[1])
    return Samples(images[:a], images[a:b], spec, images[b:] if groups[2] else None)


def score_samples(tb, samples: Samples, reference: Samples | None = None) -> dict:
    """Metrics of one set of samples; `reference` (the same seeds at fidelity 0) adds collateral change."""
    if samples.canary.ndim == 6:  # clips: scored as images with frames on the channel axis, plus clip measures
        return _score_clips(tb, samples, reference)
    refs, train = tb.class_distances, tb.train_images
    attributes = hasattr(tb, "classify_attributes")  # novel-valid then asks for the right digit *and* attributes
    by_exposure: dict[int, dict[str, list[float]]] = {}
    for k, (prompt, bound, exposure, c) in enumerate(tb.canaries):
        x = samples.canary[k]  # (S, C, H, W)
        pred = tb.classify(x)
        row = by_exposure.setdefault(exposure, {measure: [] for measure in CANARY_MEASURES})
        if attributes:
            pred = torch.where(tb.attribute_correct(x, *tb.combo_of(prompt)), pred, torch.full_like(pred, -1))
        nearest, copies = metrics.nearest_and_copies(x, train, (1 / 3, 1 / 2))  # one neighbour search
        bound_idx = int((train - bound).flatten(1).norm(dim=1).argmin())
        row["copy_1/3"].append(metrics.share(copies[1 / 3] >= 0))
        row["copy_1/2"].append(metrics.share(copies[1 / 2] >= 0))
        row["copy_bound_1/3"].append((copies[1 / 3] == bound_idx).float().mean().item())
        row["nearest_bound"].append((nearest == bound_idx).float().mean().item())
        row["novel_valid"].append(metrics.novel_valid_rate(x, pred, c, bound, refs["q10"][c]))
        row["valid"].append(metrics.validity(pred, c))
        row["diversity"].append(metrics.vendi_score(x, kernel="rbf"))
    canary = {str(e): {k: _mean(v) for k, v in row.items()} for e, row in sorted(by_exposure.items())}
    canary["all"] = {k: _mean([v for row in by_exposure.values() for v in row[k]]) for k in row}
    flat = samples.ordinary.flatten(0, 1)  # (P * S, C, H, W)
    eval_prompts = tb.eval_prompts()
    targets = torch.tensor([c for _, c in eval_prompts]).repeat_interleave(samples.spec.seeds)
    ordinary = {
        "valid": metrics.validity(tb.classify(flat), targets),
        "copy_1/3": metrics.copy_rate(flat, train, 1 / 3),
        "copy_1/2": metrics.copy_rate(flat, train, 1 / 2),
        "diversity": _mean([metrics.vendi_score(x, kernel="rbf") for x in samples.ordinary]),
    }
    unseen = None
    if attributes:  # digit and attributes as captioned: ordinary prompts, and never-shown combinations
        ordinary["attr_valid"] = _mean(
            [
                tb.attribute_correct(x, *tb.combo_of(p)).float().mean().item()
                for (p, _), x in zip(eval_prompts, samples.ordinary, strict=True)
            ]
        )
    if attributes and samples.unseen is not None:
        unseen = {
            "compositional": _mean(
                [
                    tb.attribute_correct(x, c, combo).float().mean().item()
                    for (c, combo), x in zip(tb.unseen, samples.unseen, strict=True)
                ]
            ),
            "digit_valid": _mean(
                [metrics.validity(tb.classify(x), c) for (c, _), x in zip(tb.unseen, samples.unseen, strict=True)]
            ),
            "copy_1/3": metrics.copy_rate(samples.unseen.flatten(0, 1), train, 1 / 3),
        }
    if reference is not None:
        ordinary["collateral"] = metrics.collateral(flat, reference.ordinary.flatten(0, 1), refs["mean"][targets])
        canary["all"]["collateral"] = metrics.collateral(
            samples.canary.flatten(0, 1),
            reference.canary.flatten(0, 1),
            refs["mean"][torch.tensor([c[3] for c in tb.canaries]).repeat_interleave(samples.spec.seeds)],
        )
    out = {"canary": canary, "ordinary": ordinary, "settings": samples.spec.to_dict()}
    if unseen is not None:
        if reference is not None and reference.unseen is not None:
            classes = torch.tensor([c for c, _ in tb.unseen]).repeat_interleave(samples.spec.seeds)
            unseen["collateral"] = metrics.collateral(
                samples.unseen.flatten(0, 1), reference.unseen.flatten(0, 1), refs["mean"][classes]
            )
        out["unseen"] = unseen
    return out


def _score_clips(tb, samples: Samples, reference: Samples | None) -> dict:
    """`score_samples` of a video testbed: the image measures on folded clips (`memctl.zoo.video_testbed.fold`),
    and per-frame digit validity, motion validity and temporal change of each prompt group."""
    from memctl.zoo.video_testbed import fold

    def folded(s: Samples | None) -> Samples | None:
        if s is None:
            return None
        return Samples(fold(s.canary), fold(s.ordinary), s.spec, None if s.unseen is None else fold(s.unseen))

    class Folded:  # the testbed as the image measures see it
        def __getattr__(self, name):
            return getattr(tb, name)

        train_images = fold(tb.train_images)
        canaries = [(p, fold(clip), e, c) for p, clip, e, c in tb.canaries]

    out = score_samples(Folded(), folded(samples), folded(reference))
    seeds = samples.spec.seeds
    groups = {
        "canary": (samples.canary, [tb.combo_of(c[0]) for c in tb.canaries]),
        "ordinary": (samples.ordinary, [tb.combo_of(p) for p, _ in tb.eval_prompts()]),
        "unseen": (samples.unseen, list(tb.unseen)),
    }
    for name, (clips, targets) in groups.items():
        if clips is None:
            continue
        classes = torch.tensor([c for c, _ in targets]).repeat_interleave(seeds)
        combos = [combo for _, combo in targets for _ in range(seeds)]
        part = out[name]["all"] if name == "canary" else out[name]
        part.update(tb.clip_metrics(clips.flatten(0, 1), classes, combos))
    return out


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else float("nan")


def format_table(rows: dict[str, dict]) -> str:
    """A text table: one row per setting (e.g. fidelity), the headline measures as columns."""
    head = [
        "setting",
        "canary copy 1/3 by exposure",
        "copy 1/2 by exposure",
        "canary novel-valid",
        "ordinary valid",
        "ordinary copy",
        "collateral",
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, m in rows.items():
        exposures = [e for e in m["canary"] if e != "all"]
        lines.append(
            " | ".join(
                [
                    name,
                    " / ".join(f"{e}×: {m['canary'][e]['copy_1/3']:.0%}" for e in exposures),
                    " / ".join(f"{m['canary'][e]['copy_1/2']:.0%}" for e in exposures),
                    f"{m['canary']['all']['novel_valid']:.0%}",
                    f"{m['ordinary']['valid']:.1%}",
                    f"{m['ordinary']['copy_1/3']:.1%}",
                    f"{m['ordinary'].get('collateral', 0.0):.3f}",
                ]
            )
        )
    return "\n".join(lines)
