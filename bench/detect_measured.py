"""Detection candidates scored against *measured* copying, on the calibration split only.

    python bench/detect_calibrate.py   # the readings (digits-s0, digits-attr-s0, seeds 0-7), if not there
    python bench/detect_measured.py    # -> bench/results/detect_measured.{json,md}

A prompt's group says what it was trained as, not what it does: on digits an untrained tag in the canary format
makes the model draw canary images, so a "decoy" may copy. Here every prompt of the calibration readings (canaries,
held-out ordinary prompts, decoys, the reference half and the decoys made from it) is sampled at `LABEL_SEEDS`
(the testbed's guidance, 25 steps) and labelled by its copy rate (`memctl.detect_bench.prompt_copy_rates`).

Candidates: every set of one to three signals, each given the seeds in turn as `memctl.signals.read_signals`
does (`split_seeds`), combined as the mean of their robust z-scores against the reference half
(`memctl.signals.combine`); kept when they cost at most 4 denoiser evaluations per prompt and seed on average.
Score: ROC AUC and TPR at 1 % FPR of the prompts that copy (copy rate >= `COPYING`) against those that never
copied, pooled over all groups but the reference; the choice is the best mean AUC over the two calibration models.
For the chosen set (`memctl.signals.COMBINED`) the share flagged (p <= `ALPHA`) per group is also given for two
verdict references: the ordinary prompts plus the decoys made from them (the default) and the ordinary prompts alone,
with each group's median risk.
The evaluation models (digits-s1, digits-s2, digits-attr-s1, moving-digits) and seeds (100-107) are not read.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch

from memctl.atomic import atomic_write
from memctl.detect_bench import COPYING, prompt_copy_rates, tpr_at_fpr
from memctl.detection import roc_auc
from memctl.signals import ALPHA, COMBINED, EVALS, SIGNALS, combine, p_values

RESULTS = Path(__file__).parent / "results"
LABEL_SEEDS = tuple(range(300, 316))  # ground-truth sampling seeds of the calibration split
MAX_EVALS = 4.0


def labels(model: str, groups: dict) -> dict[str, list[float]]:
    """Copy rate of every prompt of every group."""
    from memctl.zoo import load_testbed

    tb = load_testbed(model)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for g in groups.values() for p in g["prompts"]]
    rates = prompt_copy_rates(tb, pipe, prompts, LABEL_SEEDS)
    out, start = {}, 0
    for g, v in groups.items():
        out[g] = [round(float(x), 4) for x in rates[start : start + len(v["prompts"])]]
        start += len(v["prompts"])
    return out


def candidate_sets() -> list[tuple[str, ...]]:
    sets = [c for k in (1, 2, 3) for c in itertools.combinations(SIGNALS, k)]
    return [c for c in sets if sum(EVALS[s] for s in c) / len(c) <= MAX_EVALS]


def risks(groups: dict, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each group's risk under the combination of `names`: signal i on seeds i, i + k, … (as
    `memctl.signals.read_signals` splits them), z-scores against the reference group (`memctl.signals.combine`)."""
    k = len(names)

    def mean(g):
        return {s: torch.tensor(groups[g][s])[i::k].mean(0) for i, s in enumerate(names)}

    ref = mean("reference")
    return {g: combine(mean(g), ref) for g in groups}


def score(groups: dict, copies: dict, names: tuple[str, ...]) -> dict:
    """One candidate on one model: AUC / TPR at 1 % FPR of the prompts that copy against those that never did."""
    scored = [g for g in groups if g != "reference"]
    risk_of = risks(groups, names)
    risk = torch.cat([risk_of[g] for g in scored])
    rate = torch.tensor([x for g in scored for x in copies[g]])
    pos, neg = risk[rate >= COPYING], risk[rate == 0]
    return {"auc": round(roc_auc(pos, neg), 3), "tpr1": round(tpr_at_fpr(pos, neg), 3), "copying": len(pos),
            "never_copied": len(neg)}  # fmt: skip


def verdicts(groups: dict, copies: dict) -> dict:
    """Share flagged per group by `COMBINED` (p <= `ALPHA`), against the reference with and without made decoys;
    each group also split into its prompts that copy and those that never copied."""
    risk = risks(groups, COMBINED)
    refs = {
        "ordinary + made decoys": torch.cat([risk["reference"], risk["made_decoys"]]),
        "ordinary": risk["reference"],
    }
    out = {"median_risk": {g: round(float(r.median()), 2) for g, r in risk.items()}}
    for name, ref in refs.items():
        out[name] = {}
        for g in groups:
            if g == "reference":
                continue
            flagged, rate = p_values(risk[g], ref) <= ALPHA, torch.tensor(copies[g])
            cell = {"all": round(float(flagged.float().mean()), 3)}
            for part, mask in (("copying", rate >= COPYING), ("never_copied", rate == 0)):
                if mask.any():
                    cell[part] = round(float(flagged[mask].float().mean()), 3)
            out[name][g] = cell
    return out


def markdown(result: dict) -> str:
    models = list(result["models"])
    lines = [
        "# Detection candidates against measured copying (calibration split)",
        f"`{result['command']}`: {', '.join(models)} at seeds 0-7 (the readings of `bench/detect_calibrate.py`); "
        f"labels from {len(LABEL_SEEDS)} samples per prompt at seeds {LABEL_SEEDS[0]}-{LABEL_SEEDS[-1]}. AUC / TPR "
        f"at 1 % FPR of the prompts that copy (copy rate >= {COPYING:.0%}) against those that never copied, every "
        "group but the reference pooled. Sorted by the mean AUC over the models.",
        "",
    ]
    for m in models:
        g = result["models"][m]
        rates = ", ".join(f"{k} {sum(v) / len(v):.0%}" for k, v in g["copy_rate"].items())
        lines.append(f"- {m}: copy rate by group: {rates}.")
    lines += ["", " | ".join(["signals (evals)", *models, "mean AUC"]), " | ".join(["---"] * (len(models) + 2))]
    for row in result["candidates"]:
        cells = [f"{row[m]['auc']:.2f} / {row[m]['tpr1']:.2f}" for m in models]
        name = f"{' + '.join(row['signals'])} ({row['evals']:.2f})"
        lines.append(" | ".join([name, *cells, f"{row['mean_auc']:.3f}"]))
    lines += ["", f"## The default ({' + '.join(COMBINED)}): share flagged at p <= {ALPHA}, by verdict reference", ""]
    lines.append("share flagged: all (copying / never copied)")
    for m in models:
        medians = ", ".join(f"{g} {v:.2f}" for g, v in result["verdicts"][m]["median_risk"].items())
        lines.append(f"- {m}, median risk by group: {medians}.")
        for ref, table in result["verdicts"][m].items():
            if ref == "median_risk":
                continue
            cells = [f"{g} {c['all']:.0%} ({_pct(c.get('copying'))} / {_pct(c.get('never_copied'))})"
                     for g, c in table.items()]  # fmt: skip
            lines.append(f"- {m}, against {ref}: " + "; ".join(cells) + ".")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _cached_labels(argv: list[str]) -> dict:
    """`--labels-from FILE`: the copy rates of an earlier run's JSON (sampling is most of the cost)."""
    if not argv:
        return {}
    if argv[0] != "--labels-from" or len(argv) != 2:
        raise SystemExit(f"usage: python bench/detect_measured.py [--labels-from JSON]; got {argv}")
    earlier = json.loads(Path(argv[1]).read_text())
    if earlier.get("label_seeds") != list(LABEL_SEEDS):
        raise SystemExit(f"Expected labels at seeds {LABEL_SEEDS[0]}-{LABEL_SEEDS[-1]} in {argv[1]}.")
    return {m: r["copy_rate"] for m, r in earlier["models"].items()}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    readings = json.loads((RESULTS / "detect_calibration.json").read_text())
    models = {m: r for m, r in readings.items() if not m.startswith("_")}
    cached = _cached_labels(argv)
    copies = {m: cached.get(m) or labels(m, r["groups"]) for m, r in models.items()}
    labelled = {"label_seeds": list(LABEL_SEEDS), "models": {m: {"copy_rate": copies[m]} for m in models}}
    atomic_write(RESULTS / "detect_measured.json", json.dumps(labelled).encode())  # the labels, kept if scoring fails
    rows = []
    for names in candidate_sets():
        row = {"signals": list(names), "evals": round(sum(EVALS[s] for s in names) / len(names), 2)}
        for m, r in models.items():
            row[m] = score(r["groups"], copies[m], names)
        row["mean_auc"] = round(sum(row[m]["auc"] for m in models) / len(models), 3)
        rows.append(row)
    rows.sort(key=lambda r: (-r["mean_auc"], r["evals"]))
    result = {
        "command": "python bench/detect_measured.py",
        "labels_reused": bool(cached),  # --labels-from: the copy rates of an earlier run (same seeds), not re-sampled
        "label_seeds": list(LABEL_SEEDS),
        "seconds": round(time.perf_counter() - t0, 1),
        "models": {m: {"copy_rate": copies[m]} for m in models},
        "candidates": rows,
        "verdicts": {m: verdicts(r["groups"], copies[m]) for m, r in models.items()},
    }
    atomic_write(RESULTS / "detect_measured.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write(RESULTS / "detect_measured.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main(sys.argv[1:])
