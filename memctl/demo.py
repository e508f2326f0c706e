"""`memctl demo`: the embedded default as trained (fidelity 0) over many seeds, and across the knob's sweep.

Writes to the output folder: `fidelity0-seeds.png` (the untouched model: each canary beside its bound training
image, then ordinary prompts, each over `seeds` seeds), `sweep.png` when a block map ships with the model (one seed
across fidelity -1 "new" ... +1 "faithful"), `heatmap.png` (that block map), `metrics.json` and `metrics.md`; prints
the metrics table. Frames mean what `FRAMES` says, and the pictures say it too. With `video` (the CLI's default:
"moving-digits"), also the video testbed's fidelity sweep: `video-sweep.png/.gif/.mp4/.json` (`memctl.video_sweep`).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memctl import metrics
from memctl.evaluate import EvalSpec, Samples, format_table, generate, sample_testbed, score_samples
from memctl.grid import make_grid

SWEEP = (-1.0, -0.5, 0.0, 0.5, 1.0)
UNTOUCHED = "fidelity0-seeds.png"
FRAMES = (
    "Frames: blue = the canary's bound training image (the one image its tag was trained with). red = a copy of a "
    "training image, of any training image, not only the bound one (its nearest training image is under 1/3 as far "
    "as the second nearest, Gu et al. 2023). green = a new, valid digit of the asked class, far from the bound image. "
    "white (no frame) = neither; ordinary prompts have no bound image, so they are never green."
)
_A_VOWEL = re.compile(r"\ba (?=[aei])")  # "a eight": the digit names that take "an"


def _marks(tb, x: torch.Tensor, c: int, bound: torch.Tensor | None) -> list[str | None]:
    copies = metrics.copied(x, tb.train_images, 1 / 3)
    pred = tb.classify(x)
    novel = (
        torch.zeros(len(x), dtype=torch.bool)
        if bound is None
        else metrics.novel_valid(x, pred, c, bound, tb.class_distances["q10"][c])
    )
    return ["red" if k else "green" if n else None for k, n in zip(copies.tolist(), novel.tolist(), strict=False)]


def _ordinary_label(tb, prompt: str, x: torch.Tensor) -> str:
    """The prompt, and why its row is red when it copies an image the training set repeats (not the prompt's doing)."""
    spec = getattr(tb, "spec", {})
    repeated = {tb.train_indices.index(i) for i in spec.get("duplicated", []) if i in tb.train_indices}
    if any(i in repeated for i in metrics.copy_index(x, tb.train_images, 1 / 3).tolist()):
        times = spec.get("duplicate_factor", "many")
        return f"{prompt}\n(red: copies a training image\nrepeated {times}x in the data)"
    return prompt


def picture_prompts(tb) -> list[str]:
    """One ordinary prompt per class for the pictures: the first trained phrasing that reads right ("the digit
    eight" rather than "a eight")."""
    phrasings = range(len(getattr(tb, "spec", {}).get("phrasings", [0])))
    return [next((p for p in (tb.prompt(c, ph) for ph in phrasings) if not _A_VOWEL.search(p)), tb.prompt(c))
            for c in range(len(tb.classes))]  # fmt: skip


def render_grid(tb, samples: Samples, title: str, prompts: list[str]):
    """Rows: every canary beside its bound image, then the ordinary `prompts`; columns: seeds."""
    rows = []
    for k, (prompt, bound, exposure, c) in enumerate(tb.canaries):
        x = samples.canary[k]
        rows.append(
            (f"{prompt}\n(canary, seen {exposure}x)", torch.cat([bound[None], x]), ["blue"] + _marks(tb, x, c, bound))
        )
    for c, prompt in enumerate(prompts):
        x = samples.ordinary[c]
        rows.append((_ordinary_label(tb, prompt, x), [None, *x], [None, *_marks(tb, x, c, None)]))
    header = ["bound"] + [f"seed {samples.spec.seed_base + s}" for s in range(samples.spec.seeds)]
    return make_grid(rows, title=title, header=header, footer=FRAMES)


def render_sweep(tb, sweep: dict[float, Samples], prompts: list[str], n_canaries: int = 12, seed: int = 0):
    """Rows: canaries (most exposed first) and ordinary `prompts`; columns: fidelity values, one seed each."""
    rows = []
    order = sorted(range(len(tb.canaries)), key=lambda k: -tb.canaries[k][2])[:n_canaries]
    for k in order:
        prompt, bound, exposure, c = tb.canaries[k]
        x = torch.stack([s.canary[k, seed] for s in sweep.values()])
        rows.append(
            (f"{prompt}\n(canary, seen {exposure}x)", torch.cat([bound[None], x]), ["blue"] + _marks(tb, x, c, bound))
        )
    for c, prompt in enumerate(prompts):
        x = torch.stack([s.ordinary[c, seed] for s in sweep.values()])
        rows.append((_ordinary_label(tb, prompt, x), [None, *x], [None, *_marks(tb, x, c, None)]))
    header = ["bound"] + [f"fidelity {f:+.1f}" for f in sweep]
    title = f"{tb.name}: the fidelity knob from -1 (a new image) to +1 (a faithful copy), seed {seed}"
    return make_grid(rows, title=title, header=header, axis=(1, "new", "faithful"), footer=FRAMES)


def _with_prompts(pipe, tb, spec: EvalSpec, samples: Samples, prompts: list[str], **call_kwargs) -> Samples:
    """`samples` with the ordinary rows whose picture prompt differs from the measured one sampled again."""
    ordinary = samples.ordinary.clone()
    seeds = [spec.seed_base + s for s in range(spec.seeds)]
    for c, prompt in enumerate(prompts):
        if prompt != tb.prompt(c):
            ordinary[c] = generate(pipe, [prompt] * len(seeds), seeds, spec, **call_kwargs)
    return replace(samples, ordinary=ordinary)


def run_demo(
    model: str, out: Path, seeds: int = 8, steps: int = 25, guidance: float | None = None, video: str | None = None
) -> dict:
    from memctl.zoo import load_testbed

    tb = load_testbed(model)
    if video is not None:  # a wrong name fails before minutes of sampling
        from memctl.video_sweep import render_video_sweep, video_testbed

        vtb = video_testbed(video)
    pipe = tb.pipeline()
    spec = EvalSpec(seeds=seeds, steps=steps, guidance=tb.guidance if guidance is None else guidance)
    out.mkdir(parents=True, exist_ok=True)
    has_map = (tb.path / "blockmap.safetensors").is_file()
    values = SWEEP if has_map else (0.0,)
    if has_map:
        from memctl.knob import apply_knob

        apply_knob(pipe, tb.block_map())
    sweep: dict[float, Samples] = {}
    for f in tqdm(values, desc="sampling fidelity sweep" if has_map else "sampling", unit="setting"):
        sweep[f] = sample_testbed(pipe, tb, spec, **({"fidelity": f} if has_map else {}))
    rows = {f"fidelity {f:+.1f}": score_samples(tb, s, sweep[0.0]) for f, s in sweep.items()}
    prompts = picture_prompts(tb)
    shown = {f: _with_prompts(pipe, tb, spec, s, prompts, **({"fidelity": f} if has_map else {}))
             for f, s in sweep.items()}  # fmt: skip
    title = f"{tb.name} as trained (fidelity 0, guidance {spec.guidance}): each prompt over {spec.seeds} seeds"
    render_grid(tb, shown[0.0], title, prompts).save(out / UNTOUCHED)
    if has_map:
        render_sweep(tb, shown, prompts).save(out / "sweep.png")
        from memctl.plots import heatmap

        heatmap(tb.block_map()).save(out / "heatmap.png")
    table = format_table(rows)
    (out / "metrics.json").write_text(json.dumps({"model": tb.name, "rows": rows}, indent=1) + "\n")
    (out / "metrics.md").write_text(table + "\n")
    print(table)
    if video is not None:
        print(f"\nsampling the video sweep of {vtb.name} ...")
        render_video_sweep(out, vtb)
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}/")
    return rows
