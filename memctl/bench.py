"""`memctl bench SUITE`: measurements written as JSON (and a markdown table) under `bench/results/`.

Suite `digits`: each embedded model at fidelity 0, a guidance sweep, ≥ 8 evaluation seeds per canary, with the
quality bar of the embedded default checked against the measured numbers. Suite `effect`: `memctl.effect`.
Suite `detect`: prompt-only memorization detection, every signal of `memctl.signals` (`memctl.detect_bench`).
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
SUITES = ("digits", "effect", "detect", "speed")


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


_EFFECT_COLUMNS = ("most-exposed copy", "least-exposed copy", "canary novel-valid", "compositional",
                   "ordinary valid", "collateral", "denoiser evals / image", "s / image")  # fmt: skip


_VIDEO_COLUMNS = ("most-exposed nearest bound", "frame valid", "motion valid", "temporal change")


# checks of rows outside the bars (`memctl.effect.bars`), in the order the table lists them
OTHER_CHECKS = (
    ("in_attention_fidelity_checks", "fidelity in-attention"),
    ("cached_fidelity_checks", "fidelity cached"),
    ("per_prompt_fidelity_checks", "fidelity per-prompt γ"),
    ("per_prompt_cached_fidelity_checks", "fidelity per-prompt γ cached"),
    ("bake_checks", "baked"),
    ("composed_checks", "composed"),
    ("composed_window_checks", "composed t ≥ 0.7"),
    ("composed_calibrated_checks", "composed calibrated window"),
)


def _effect_md(results: dict) -> list[str]:
    md = []
    for model, r in results.items():
        bars = r["bars"]
        attr = r.get("testbed") in ("digits-attr", "moving-digits")  # captions with attributes (motion on clips)
        md.append(f"\n## {model}: bars {'PASS' if bars['pass'] else 'FAIL'} (condition probe {r['probe_seconds']} s, "
                  f"prompt-only detect + probe {r['prompt_map']['seconds']} s)\n\n")  # fmt: skip
        md += [f"- {'PASS' if ok else 'FAIL'}: {name}\n" for name, ok in bars["checks"].items()]
        for key, what in OTHER_CHECKS:
            md += [f"- {'PASS' if ok else 'FAIL'}: {what} (not in the bars above): {name}\n"
                   for name, ok in bars.get(key, {}).items()]  # fmt: skip
        md += [f"- not measured, {row}: {err}\n" for row, err in r.get("errors", {}).items()]
        if r["prompt_map"].get("error"):
            md.append(f"- no prompt-only map rows: {r['prompt_map']['error']}\n")
        if bars.get("trivial_fidelity_check"):
            md.append("- note: the least-exposed canaries are copied 0 % by the plain model, so the 1.5× check holds "
                      "whatever +1 does\n")  # fmt: skip
        ctl = bars["controls_at_map_copy"]
        md.append(f"\nAt the map's most-exposed copy rate at −1 ({bars['map_at_-1']['most_copy']:.0%}): "
                  + "; ".join(f"{fam} " + ", ".join(f"{k} {v:.0%}" for k, v in c.items()) for fam, c in ctl.items())
                  + "; map " + ", ".join(f"{k} {bars['map_at_-1'][k]:.0%}" for k in bars["margin_over_best_control"])
                  + ".\n")  # fmt: skip
        novel = "attribute-correct novel" if attr else "novel-valid"
        valid = "digit and attributes" if attr else "digit"
        md.append(f"\nCanary {novel}; ordinary valid = {valid} read as captioned; compositional = never-shown "
                  f"combinations read as captioned{'' if attr else ' (n/a on this testbed)'}.\n\n")  # fmt: skip
        video = r.get("testbed") == "moving-digits"
        if video:
            md.append("On clips: ordinary valid = digit and motion read as captioned; also the ordinary clips' "
                      "per-frame digit validity, motion validity, and frame-to-frame change over real clips'. "
                      "Most-exposed nearest bound: the share of the most-exposed canaries' clips whose nearest "
                      "training clip is the canary's bound clip, whether or not d1 < d2 / 3 makes it a "
                      "copy.\n\n")  # fmt: skip
        head = ["row", "setting", *_EFFECT_COLUMNS, *(_VIDEO_COLUMNS if video else ())]
        md += [" | ".join(head) + "\n", " | ".join("---" for _ in head) + "\n"]
        for fam, by in r["rows"].items():
            for setting, row in by.items():
                h = bars["headline"][fam][setting]
                comp = f"{h['compositional']:.0%}" if "compositional" in h else "–"
                cost = row["cost"]
                cells = [fam, setting, f"{h['most_copy']:.0%}", f"{h['least_copy']:.0%}", f"{h['novel_valid']:.0%}",
                         comp, f"{h['ordinary_valid']:.0%}", f"{h['collateral']:.3f}",
                         f"{cost['denoiser_evals_per_image']:g}", f"{cost['seconds_per_image']:.4f}"]  # fmt: skip
                if video:
                    o, most = row["ordinary"], max((e for e in row["canary"] if e != "all"), key=int)
                    near = row["canary"][most].get("nearest_bound")  # absent from records made before it was
                    cells += ["–" if near is None else f"{near:.0%}", f"{o['frame_valid']:.0%}",
                              f"{o['motion_valid']:.0%}", f"{o['temporal_change']:.2f}"]  # fmt: skip
                md.append(" | ".join(cells) + "\n")
    return md


def effect_summary(results: dict) -> str:
    """One compact table over models: per row, most-exposed copy / canary novel-valid / compositional / ordinary
    valid (the first setting of a family at fidelity −1 where it has one; medians over control seeds)."""
    import statistics

    models = list(results)
    picks = [("plain", "0"), ("memctl map", "-1.0"), ("memctl map", "+1.0"), ("memctl map in-attention", "+1.0"),
             ("memctl map cached", "+1.0"), ("memctl map per-prompt γ", "+1.0"),
             ("memctl map per-prompt γ cached", "+1.0"), ("memctl map baked", "-1.0"),
             ("composed", "-1.0"), ("composed t ≥ 0.7", "-1.0"), ("composed calibrated window", "-1.0"),
             ("memctl prompt map", "-1.0"),
             ("uniform", "-1.0"), ("uniform guidance", "+1.0"), ("uniform guidance cached", "+1.0"),
             ("text edit", "-1.0"), ("placement shuffled", None), ("random subspace", None),
             ("wen", "quantile 0.5"), ("ren", "c 1.25"), ("jain", "transition 0.6"),
             ("nemo", "quantile 0.999")]  # fmt: skip
    head = ["row"] + models
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for fam, setting in picks:
        cells = [fam + (f" {setting}" if setting and setting != "0" else "")]
        for m in models:
            by = results[m]["bars"]["headline"].get(fam)
            if not by or (setting and setting not in by):
                cells.append("–")
                continue
            hs = [by[setting]] if setting else list(by.values())
            med = {k: statistics.median(h[k] for h in hs) for k in hs[0]}
            evals = statistics.median(
                results[m]["rows"][fam][s]["cost"]["denoiser_evals_per_image"] for s in ([setting] if setting else by)
            )
            comp = f" / {med['compositional']:.0%}" if "compositional" in med else ""
            cells.append(f"{med['most_copy']:.0%} / {med['novel_valid']:.0%}{comp} / {med['ordinary_valid']:.0%} "
                         f"({evals:g})")  # fmt: skip
        lines.append(" | ".join(cells))
    return "\n".join(lines) + "\n"


def run_bench(
    suite: str, out: Path, models: list[str], quick: bool = False, seeds: int | None = None, noise: str = "per-prompt"
) -> dict:
    torch.set_num_threads(1)
    seeds = seeds or (2 if quick else 8)
    if suite not in SUITES:
        raise ValueError(f"Expected suite in {SUITES}, but got {suite!r}.")
    if suite == "speed":  # memctl.speed: per-forward cost, its own models and tables
        from memctl.speed import bench_speed

        return bench_speed(out, quick=quick)
    t0 = time.perf_counter()
    if suite == "effect":
        from memctl.effect import effect_for_model
        from memctl.effect_video import effect_for_video, is_video

        results, per_model = {}, out / ("effect-quick" if quick else "effect")
        per_model.mkdir(parents=True, exist_ok=True)
        for name in models:  # one file per model as it finishes, so a long run keeps what it measured
            if is_video(name):  # clips: the knob and the controls, rows written as they come (memctl.effect_video)
                partial = per_model / f"{name}.partial.json"
                results[name] = effect_for_video(name, seeds=seeds, partial=partial, noise=noise)
            else:
                results[name] = effect_for_model(name, seeds=seeds, noise=noise)
            command = f"memctl bench effect --seeds {seeds} --noise {noise} --models {name}" + (" --quick" * quick)
            record = {"seeds_per_prompt": seeds, "versions": provenance(), "command": command, **results[name]}
            _write_json(per_model / f"{name}.json", record)
            (per_model / f"{name}.partial.json").unlink(missing_ok=True)
        done = [p for p in sorted(per_model.glob("*.json")) if not p.name.endswith(".partial.json")]
        results = {p.stem: json.loads(p.read_text()) for p in done}  # earlier runs too
    elif suite == "detect":
        from memctl.detect_bench import EVAL_SEEDS, bench_detect

        results = bench_detect(models, EVAL_SEEDS[:seeds])
    else:
        results = bench_digits(models, seeds)
    report = {
        "suite": suite,
        "seeds_per_prompt": seeds,
        "quick": quick,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "threads": 1},
        "versions": provenance(),
        "command": f"memctl bench {suite} --seeds {seeds}"
        + (f" --noise {noise}" if suite == "effect" else "")
        + f" --models {' '.join(models)}"
        + (" --quick" if quick else ""),
        "models": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    name = suite + ("-quick" if quick else "")
    _write_json(out / f"{name}.json", report)
    md = [f"# memctl bench {suite}\n", f"`{report['command']}`, {seeds} seeds per prompt, one CPU thread.\n"]
    if suite == "effect":  # the table merges every model's file: each was made by its own command
        md[1] = "".join(effect_commands(results))
        md += ["\nSummary: most-exposed canaries copied / canary novel-valid (attribute-correct on digits-attr) / "
               "compositional (digits-attr) / ordinary valid (denoiser evaluations per image).\n\n",
               effect_summary(results)]  # fmt: skip
        md += _effect_md(results)
    if suite == "detect":
        from memctl.detect_bench import detect_md

        md += detect_md(results)
    for model, r in results.items() if suite == "digits" else ():
        md += [
            f"\n## {model} (headline at guidance {r['guidance']}: bar {'PASS' if r['bar']['pass'] else 'FAIL'})\n",
            format_table(r["rows"]) + "\n",
        ]
    (out / f"{name}.md").write_text("".join(md))
    print("".join(md))
    return report


def effect_commands(results: dict) -> list[str]:
    """effect.md's header lines: each model's record, the command that made it, its seeds and its noise."""
    return [f"- {m}: `{r.get('command', '?')}`, {r.get('seeds_per_prompt', '?')} seeds per prompt, {_noise(r)}, one "
            "CPU thread\n" for m, r in results.items()]  # fmt: skip


def _noise(record: dict) -> str:
    """How an effect record's starting noises were drawn, in words (records without the field shared them)."""
    if record.get("eval", {}).get("noise", "shared") == "per-prompt":
        return "noise per prompt"
    return "noise shared by all prompts"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
