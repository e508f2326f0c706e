"""`memctl bench detect`: every detection signal and their combination against the testbeds' ground truth.

Per testbed, the prompts are its canaries (by exposure), its ordinary prompts and 30 decoys (prompts as unusual
as a canary and never trained: untrained tags on digits, unseen combinations and reordered captions on
digits-attr). The ordinary prompts are split in two by a fixed shuffle: one half is the *reference* (what a user
passes as `--reference`; decoys made from it complete the calibration set), the other half is the ordinary
negatives. Rows: ROC AUC and TPR at 1 % FPR of the canaries of each exposure against the held-out ordinary prompts
and against the decoys; the share flagged at the default threshold (p-value <= `ALPHA` against the reference and
its decoys); seconds per prompt for each signal (all seeds). Every signal is read on every seed; the combination
gives the seeds in turn to the signals of `COMBINED`, as `memctl.signals.screen` does.

The threshold and the first two signals of the combination were chosen on digits-s0 and digits-attr-s0 at seeds
0-7; `perturb` joined after reading those two models' values at `EVAL_SEEDS` (see `memctl.signals`), so on those two
models the combination's rows are not clean tests. digits-s1, digits-attr-s1, digits-s2 and moving-digits are.
"""

from __future__ import annotations

import random
import time

import torch

from memctl.detection import roc_auc
from memctl.signals import ALPHA, COMBINED, SIGNALS, auto_decoys, combine, p_values, read_signals, word_counts

EVAL_SEEDS = tuple(range(100, 108))  # evaluation seeds: not the 0-7 the combination was chosen on
ROWS = (*SIGNALS, "combined")


def tpr_at_fpr(positive: torch.Tensor, negative: torch.Tensor, fpr: float = 0.01) -> float:
    """Share of positives above the threshold that lets at most `fpr` of the negatives through (strictly above)."""
    neg = negative.sort(descending=True).values
    allowed = int(fpr * len(neg))  # negatives that may lie above the threshold
    threshold = neg[allowed] if allowed < len(neg) else neg[-1] - 1
    return float((positive > threshold).float().mean())


def split_ordinary(prompts: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """(reference half, held-out half) of the ordinary prompts, by a fixed shuffle."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return order[:half], order[half:]


def _per_seed(pipe, prompts, names, seeds, counts, batch_size, call_kwargs) -> tuple[dict, dict]:
    """`{signal: (S, P)}` and the seconds each signal took."""
    values: dict[str, list] = {n: [] for n in names}
    seconds = dict.fromkeys(names, 0.0)
    for seed in seeds:
        for name in names:
            t0 = time.perf_counter()
            out = read_signals(pipe, prompts, (name,), [seed], counts=counts, batch_size=batch_size, **call_kwargs)
            seconds[name] += time.perf_counter() - t0
            values[name].append(out[name])
    return {n: torch.stack(v) for n, v in values.items()}, seconds


def _combined(per_seed: dict, ref: slice) -> torch.Tensor:
    """The default combination from per-seed readings: signal i of `COMBINED` on seeds i, i + k, ..."""
    k = len(COMBINED)
    values = {n: per_seed[n][i::k].mean(0) for i, n in enumerate(COMBINED)}
    return combine(values, {n: v[ref] for n, v in values.items()})


def bench_testbed(name: str, seeds: tuple[int, ...] = EVAL_SEEDS, batch_size: int = 32) -> dict:
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    canaries = [c[0] for c in tb.canaries]
    reference, ordinary = split_ordinary(tb.ordinary_prompts())
    decoys, made = tb.decoy_prompts(30), auto_decoys(reference)
    scored = canaries + ordinary + decoys + reference
    counts = word_counts(reference)
    call = dict(getattr(tb, "call_kwargs", {}))  # a video testbed's clip size and length
    per_seed, seconds = _per_seed(pipe, scored, SIGNALS, seeds, counts, batch_size, call)
    extra, _ = _per_seed(pipe, made, COMBINED, seeds, counts, batch_size, call)  # calibration decoys: combined only
    k, n, d = len(canaries), len(ordinary), len(decoys)
    parts = {"ordinary": slice(k, k + n), "decoys": slice(k + n, k + n + d)}
    ref = slice(k + n + d, len(scored))
    values = {s: v.mean(0) for s, v in per_seed.items()}
    both = {s: torch.cat([per_seed[s], extra[s]], dim=1) for s in COMBINED}
    risk_all = _combined(both, ref)  # scored prompts, then the made decoys
    values["combined"] = risk_all[: len(scored)]
    pv = p_values(values["combined"], risk_all[ref.start :])  # against the reference and the decoys made from it
    rows = {}
    for e in tb.exposures:
        idx = [i for i, c in enumerate(tb.canaries) if c[2] == e]
        rows[str(e)] = {
            sig: {
                **{f"auc_vs_{neg}": round(roc_auc(v[idx], v[part]), 3) for neg, part in parts.items()},
                **{f"tpr1_vs_{neg}": round(tpr_at_fpr(v[idx], v[part]), 3) for neg, part in parts.items()},
            }
            for sig, v in values.items()
        }
        rows[str(e)]["flagged"] = round(float((pv[idx] <= ALPHA).float().mean()), 3)
    flagged = {neg: round(float((pv[part] <= ALPHA).float().mean()), 3) for neg, part in parts.items()}
    evals = {**{s: _evals(s) for s in SIGNALS}, "combined": round(sum(_evals(s) for s in COMBINED) / len(COMBINED), 2)}
    n_prompts = len(scored) * len(seeds)
    per_prompt = {s: round(seconds[s] / n_prompts, 4) for s in SIGNALS}
    per_prompt["combined"] = round(sum(seconds[s] for s in COMBINED) / len(COMBINED) / n_prompts, 4)
    most, today = rows[str(max(tb.exposures))]["combined"], rows[str(max(tb.exposures))]["magnitude"]
    return {
        "prompts": {"canaries": k, "ordinary": n, "decoys": d, "reference": len(reference), "made_decoys": len(made)},
        "seeds": list(seeds),
        "alpha": ALPHA,
        "rows": rows,
        "flagged": flagged,
        "evals_per_prompt_and_seed": evals,
        "seconds_per_prompt_and_seed": per_prompt,
        "bar": {
            "most-exposed combined AUC vs decoys >= 0.95": most["auc_vs_decoys"] >= 0.95,
            "most-exposed combined AUC vs ordinary >= first-step magnitude's": most["auc_vs_ordinary"]
            >= today["auc_vs_ordinary"],
            "flagged decoys <= 5 %": flagged["decoys"] <= 0.05,
            "<= 4 evaluations per prompt and seed": evals["combined"] <= 4,
        },
        "values": {s: [round(float(x), 6) for x in v] for s, v in values.items()},
        "names": {"canaries": canaries, "ordinary": ordinary, "decoys": decoys, "reference": reference},
    }


def _evals(signal: str) -> int:
    from memctl.signals import EVALS

    return EVALS[signal]


def bench_detect(models: list[str], seeds: tuple[int, ...] = EVAL_SEEDS) -> dict:
    return {name: bench_testbed(name, seeds) for name in models}


def detect_md(results: dict) -> list[str]:
    md = [
        "\nCanaries of each exposure against held-out ordinary prompts and against decoys: ROC AUC / TPR at 1 % "
        f"FPR. Flagged: p-value <= {ALPHA} against the reference half of the ordinary prompts plus decoys made from "
        "it (the default verdict). The threshold and magnitude2 + contrast2 were chosen on digits-s0 / digits-attr-s0 "
        "at seeds 0-7; perturb joined the combination after reading those two models' rows at these seeds, so their "
        "combined rows are not clean tests; digits-s1, digits-attr-s1, digits-s2 and moving-digits are.\n"
    ]
    for model, r in results.items():
        ok = all(r["bar"].values())
        md.append(f"\n## {model}: bar {'PASS' if ok else 'FAIL'} (seeds {r['seeds'][0]}-{r['seeds'][-1]})\n\n")
        md += [f"- {'PASS' if v else 'FAIL'}: {k}\n" for k, v in r["bar"].items()]
        exposures = [e for e in r["rows"]]
        head = ["signal (evals)", *[f"{e}× vs ordinary" for e in exposures], *[f"{e}× vs decoys" for e in exposures],
                "s / prompt"]  # fmt: skip
        md += ["\n" + " | ".join(head) + "\n", " | ".join("---" for _ in head) + "\n"]
        for sig in ROWS:
            cells = [f"{sig} ({r['evals_per_prompt_and_seed'][sig]})"]
            for neg in ("ordinary", "decoys"):
                cells += [f"{r['rows'][e][sig][f'auc_vs_{neg}']:.2f} / {r['rows'][e][sig][f'tpr1_vs_{neg}']:.2f}"
                          for e in exposures]  # fmt: skip
            cells.append(f"{r['seconds_per_prompt_and_seed'][sig] * len(r['seeds']):.3f}")
            md.append(" | ".join(cells) + "\n")
        flags = ", ".join(f"{e}× {r['rows'][e]['flagged']:.0%}" for e in exposures)
        md.append(f"\nFlagged: canaries {flags}; decoys {r['flagged']['decoys']:.0%}; held-out ordinary "
                  f"{r['flagged']['ordinary']:.0%}.\n")  # fmt: skip
    return md
