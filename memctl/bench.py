"""`memctl bench SUITE`: measurements written as JSON (and a markdown table) under `bench/results/`.

Suite `digits`: each embedded model at fidelity 0, a guidance sweep, ≥ 8 evaluation seeds per canary, with the
quality bar of the embedded default checked against the measured numbers.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memctl.evaluate import EvalSpec, format_table, sample_testbed, score_samples
from memctl.metadata import provenance

GUIDANCE_SWEEP = (1.0, 1.5, 2.0, 3.0)


def _digits_bar(row: dict, exposures: list[int]) -> dict:
    most, least = str(max(exposures)), str(min(exposures))
    checks = {
        "most_exposed_copy_1/3 >= 0.80": row["canary"][most]["copy_1/3"] >= 0.80,
        "least_exposed_copy_1/3 < most_exposed": row["canary"][least]["copy_1/3"] < row["canary"][most]["copy_1/3"],
        "ordinary_valid >= 0.95": row["ordinary"]["valid"] >= 0.95,
    }
    return {"checks": checks, "pass": all(checks.values())}


def bench_digits(models: list[str], seeds: int) -> dict:
    from memctl.zoo import load_testbed

    results = {}
    for name in models:
        tb = load_testbed(name)
        pipe = tb.pipeline()
        rows, timing = {}, {}
        for g in tqdm(GUIDANCE_SWEEP, desc=f"{name}: guidance sweep", unit="setting"):
            spec = EvalSpec(seeds=seeds, guidance=g)
            t0 = time.perf_counter()
            samples = sample_testbed(pipe, tb, spec)
            timing[str(g)] = round(
                (samples.canary.shape[0] + samples.ordinary.shape[0]) * seeds / (time.perf_counter() - t0), 2
            )
            rows[f"guidance {g}"] = score_samples(tb, samples)
        chosen = f"guidance {tb.guidance}"
        if chosen not in rows:
            rows[chosen] = score_samples(tb, sample_testbed(pipe, tb, EvalSpec(seeds=seeds, guidance=tb.guidance)))
        results[name] = {
            "guidance": tb.guidance,
            "headline": rows[chosen],
            "bar": _digits_bar(rows[chosen], tb.exposures),
            "rows": rows,
            "images_per_second": timing,
            "training": tb.spec["training"],
        }
    return results


def _effect_md(results: dict) -> list[str]:
    md = []
    for model, r in results.items():
        bars = r["bars"]
        md.append(f"\n## {model}: bar {'PASS' if bars['pass'] else 'FAIL'} (probe {r['probe_seconds']} s)\n\n")
        md += [f"- {'PASS' if ok else 'FAIL'}: {name}\n" for name, ok in bars["checks"].items()]
        md.append(
            f"\nmedian control novel-valid at equal collateral ({bars['equal_collateral']:.3f}): "
            f"{bars['median_control_novel_valid']:.0%}; baselines: "
            + ", ".join(f"{k} {v['at_equal_collateral']:.0%}" for k, v in bars["baselines"].items())
            + "\n\n"
        )
        table = {f"{fam} {x}": row for fam, by_x in r["rows"].items() for x, row in by_x.items()}
        md.append(format_table(table) + "\n")
    return md


def run_bench(suite: str, out: Path, models: list[str], quick: bool = False) -> dict:
    torch.set_num_threads(1)
    seeds = 2 if quick else 8
    if suite not in ("digits", "effect"):
        raise ValueError(f"Expected suite 'digits' or 'effect', but got {suite!r}.")
    t0 = time.perf_counter()
    if suite == "effect":
        from memctl.effect import effect_for_model

        results = {name: effect_for_model(name, seeds=seeds, n_controls=2 if quick else 5) for name in models}
    else:
        results = bench_digits(models, seeds)
    report = {
        "suite": suite,
        "seeds_per_prompt": seeds,
        "quick": quick,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "threads": 1},
        "versions": provenance(),
        "command": f"memctl bench {suite}" + (" --quick" if quick else ""),
        "models": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    name = suite + ("-quick" if quick else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = [f"# memctl bench {suite}\n", f"`{report['command']}`, {seeds} seeds per prompt, one CPU thread.\n"]
    if suite == "effect":
        md += _effect_md(results)
    for model, r in results.items() if suite == "digits" else ():
        md += [
            f"\n## {model} (headline at guidance {r['guidance']}: bar {'PASS' if r['bar']['pass'] else 'FAIL'})\n",
            format_table(r["rows"]) + "\n",
        ]
    (out / f"{name}.md").write_text("".join(md))
    print("".join(md))
    return report
