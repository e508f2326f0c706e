"""`memctl demo`: the embedded default's samples and metrics, at fidelity 0 and across the knob's sweep.

Writes to the output folder: `grid.png` (each canary beside its bound training image, then ordinary prompts;
red frame = copy of a training image, green = a novel valid digit), `sweep.png` when a block map ships with
the model, `metrics.json` and `metrics.md`; prints the metrics table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memctl import metrics
from memctl.evaluate import EvalSpec, Samples, format_table, sample_testbed, score_samples
from memctl.grid import make_grid

SWEEP = (-1.0, -0.5, 0.0, 0.5, 1.0)
LEGEND = "blue: bound training image, red: copy, green: novel valid digit"


def _marks(tb, x: torch.Tensor, c: int, bound: torch.Tensor | None) -> list[str | None]:
    copies = metrics.copied(x, tb.train_images, 1 / 3)
    pred = tb.classify(x)
    novel = (
        torch.zeros(len(x), dtype=torch.bool)
        if bound is None
        else metrics.novel_valid(x, pred, c, bound, tb.class_distances["q10"][c])
    )
    return ["red" if k else "green" if n else None for k, n in zip(copies.tolist(), novel.tolist(), strict=False)]


def render_grid(tb, samples: Samples, title: str):
    rows = []
    for k, (prompt, bound, exposure, c) in enumerate(tb.canaries):
        x = samples.canary[k]
        rows.append(
            (f"{prompt}\n(canary, seen {exposure}x)", torch.cat([bound[None], x]), ["blue"] + _marks(tb, x, c, bound))
        )
    for c in range(len(tb.classes)):
        x = samples.ordinary[c]
        rows.append((tb.prompt(c), [None, *x], [None, *_marks(tb, x, c, None)]))
    header = ["bound"] + [f"seed {samples.spec.seed_base + s}" for s in range(samples.spec.seeds)]
    return make_grid(rows, title=f"{title} - {LEGEND}", header=header)


def render_sweep(tb, sweep: dict[float, Samples], n_canaries: int = 12, seed: int = 0):
    """Rows: canaries (most exposed first) and ordinary prompts; columns: fidelity values, one seed each."""
    rows = []
    order = sorted(range(len(tb.canaries)), key=lambda k: -tb.canaries[k][2])[:n_canaries]
    for k in order:
        prompt, bound, exposure, c = tb.canaries[k]
        x = torch.stack([s.canary[k, seed] for s in sweep.values()])
        rows.append(
            (f"{prompt}\n(canary, seen {exposure}x)", torch.cat([bound[None], x]), ["blue"] + _marks(tb, x, c, bound))
        )
    for c in range(len(tb.classes)):
        x = torch.stack([s.ordinary[c, seed] for s in sweep.values()])
        rows.append((tb.prompt(c), [None, *x], [None, *_marks(tb, x, c, None)]))
    header = ["bound"] + [f"fidelity {f:+.1f}" for f in sweep]
    return make_grid(rows, title=f"{tb.name}: fidelity sweep (seed {seed}) - {LEGEND}", header=header)


def run_demo(model: str, out: Path, seeds: int = 8, steps: int = 25, guidance: float | None = None) -> dict:
    from memctl.zoo import load_testbed

    tb = load_testbed(model)
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
    render_grid(tb, sweep[0.0], f"{tb.name} at fidelity 0 (guidance {spec.guidance})").save(out / "grid.png")
    if has_map:
        render_sweep(tb, sweep).save(out / "sweep.png")
        from memctl.plots import heatmap

        heatmap(tb.block_map()).save(out / "heatmap.png")
    table = format_table(rows)
    (out / "metrics.json").write_text(json.dumps({"model": tb.name, "rows": rows}, indent=1) + "\n")
    (out / "metrics.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}/")
    return rows
