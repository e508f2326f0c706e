"""`memctl bench detect`: every detection signal and their combination against the testbeds' ground truth.

Per testbed, the prompts are its canaries (by exposure), its ordinary prompts and 30 decoys (prompts as unusual
as a canary and never trained: untrained tags on digits, unseen combinations and reordered captions on
digits-attr). The ordinary prompts are split in two by a fixed shuffle: one half is the *reference* (what a user
passes as `--reference`), the other half is the ordinary negatives. Rows: ROC AUC and TPR at 1 % FPR of the
canaries of each exposure against the held-out ordinary prompts and against the decoys; the share flagged at the
default threshold (the p-value against the reference and the decoys made from it, `auto_decoys`, <= `ALPHA`);
seconds per prompt for each signal (all seeds). Every signal is read on every seed; the combination gives the seeds
in turn to the signals of `COMBINED`, as `memctl.signals.screen` does.

**Measured ground truth.** A prompt's label says what it was trained as, not what it does: on the digits models an
untrained tag in the canary format ("a zero, tag qrc") makes the model draw a canary's bound image (the tag format
itself is memorized). So each scored prompt is also *sampled* (`COPY_SEEDS`, the testbed's guidance, 25 steps)
and its copy rate measured against the training set (`memctl.metrics.copied`, d1 < d2 / 3). Extra rows: every
signal's AUC / TPR at 1 % FPR for the prompts that copy (copy rate >= `COPYING`) against the prompts that never
copied, whatever their group; the most-exposed canaries against the decoys that never copied; the Spearman
correlation of each signal with the copy rate. The video testbed is not sampled for this (a clip costs ~50
denoiser calls of its transformer, and its effect rows show no copied clip at any exposure).

The combination (`COMBINED`) was chosen against measured copying on digits-s0 and digits-attr-s0 with the signals
at seeds 0-7 and labels from seeds 300-315 (`bench/detect_measured.py`); the verdict's reference and tail on the
calibration models at four seed sets (`bench/detect_verdict.py`); the threshold is `ALPHA`. digits-s1,
digits-attr-s1, digits-s2 and moving-digits are clean tests, and `EVAL_SEEDS` were not read for the choice.
"""

from __future__ import annotations

import random
import time

import torch

from memctl import metrics
from memctl.detection import roc_auc
from memctl.evaluate import EvalSpec, generate
from memctl.signals import ALPHA, COMBINED, SIGNALS, auto_decoys, combine, p_values, read_signals, word_counts

EVAL_SEEDS = tuple(range(100, 108))  # evaluation seeds: not the 0-7 the combination was chosen on
ROWS = (*SIGNALS, "combined")
COPY_SEEDS = tuple(range(200, 216))  # ground-truth sampling seeds: neither the detection nor the calibration seeds
COPY_STEPS = 25  # as the effect bench samples
COPYING = 0.25  # a prompt "copies" when at least this share of its samples copy a training image (4 of 16)


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


def prompt_groups(tb) -> dict[str, list[str]]:
    """The calibration scripts' prompt groups of a testbed: canaries by exposure, held-out ordinary prompts, 30
    decoys, the reference half of the ordinary prompts and the decoys made from it (`auto_decoys`)."""
    reference, ordinary = split_ordinary(tb.ordinary_prompts())
    return {
        **{f"canaries_{e}": [c[0] for c in tb.canaries if c[2] == e] for e in tb.exposures},
        "ordinary": ordinary,
        "decoys": tb.decoy_prompts(30),
        "reference": reference,
        "made_decoys": auto_decoys(reference),
    }


def prompt_copy_rates(tb, pipe, prompts: list[str], seeds=COPY_SEEDS, batch_size: int = 256) -> torch.Tensor:
    """`(P,)` share of each prompt's samples (one per seed) that copy a training image (clips: frames on the
    channel axis), sampled as the testbed is evaluated: its guidance, `COPY_STEPS` steps, its clip size."""
    seeds = list(seeds)
    spec = EvalSpec(seeds=len(seeds), steps=COPY_STEPS, guidance=tb.guidance, batch_size=batch_size)
    flat = [p for _ in seeds for p in prompts]
    samples = generate(pipe, flat, [s for s in seeds for _ in prompts], spec, **dict(getattr(tb, "call_kwargs", {})))
    train = tb.train_images
    if samples.ndim == 5:  # clips (N, F, C, H, W): compared whole, frames folded into channels
        samples, train = samples.flatten(1, 2), train.flatten(1, 2)
    return metrics.copied(samples.float(), train.float()).reshape(len(seeds), len(prompts)).float().mean(0)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def measured_rows(values: dict, copies: torch.Tensor, decoys: slice, most: list[int]) -> dict:
    """Each signal against measured ground truth: prompts that copy vs prompts that never copied (every group),
    the most-exposed canaries vs the decoys that never copied, and the rank correlation with the copy rate."""
    pos = (copies >= COPYING).nonzero().flatten().tolist()
    neg = (copies == 0).nonzero().flatten().tolist()
    clean = [i for i in range(decoys.start, decoys.stop) if copies[i] == 0]
    rows = {}
    for sig, v in values.items():
        row = {"spearman_copy_rate": round(spearman(v, copies), 3)}
        if pos and neg:
            row["auc_copying"] = round(roc_auc(v[pos], v[neg]), 3)
            row["tpr1_copying"] = round(tpr_at_fpr(v[pos], v[neg]), 3)
        if clean:
            row["auc_vs_clean_decoys"] = round(roc_auc(v[most], v[clean]), 3)
        rows[sig] = row
    return {"copying": len(pos), "never_copied": len(neg), "clean_decoys": len(clean), "rows": rows}


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


def bench_testbed(
    name: str, seeds: tuple[int, ...] = EVAL_SEEDS, batch_size: int = 32, copy_seeds: tuple[int, ...] | None = None
) -> dict:
    """One testbed's rows; `copy_seeds` None: `COPY_SEEDS` for an image testbed, none (not sampled) for video."""
    from memctl.zoo import load_testbed

    tb = load_testbed(name)
    if copy_seeds is None:
        copy_seeds = () if tb.train_images.ndim == 5 else COPY_SEEDS
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
    measured = _measured(tb, pipe, scored[: ref.start], copy_seeds, values, parts, pv) if copy_seeds else None
    bar = {
        "most-exposed combined AUC vs decoys >= 0.95": most["auc_vs_decoys"] >= 0.95,
        "most-exposed combined AUC vs ordinary >= first-step magnitude's": most["auc_vs_ordinary"]
        >= today["auc_vs_ordinary"],
        "flagged decoys <= 5 %": flagged["decoys"] <= 0.05,
        "<= 4 evaluations per prompt and seed": evals["combined"] <= 4,
    }
    never = measured["flagged"]["never_copied"] if measured else None  # the same check against measured copying
    if never is not None:
        bar["flagged prompts that never copied <= 5 % (measured)"] = never <= 0.05
    return {
        "prompts": {"canaries": k, "ordinary": n, "decoys": d, "reference": len(reference), "made_decoys": len(made)},
        "seeds": list(seeds),
        "alpha": ALPHA,
        "rows": rows,
        "flagged": flagged,
        "evals_per_prompt_and_seed": evals,
        "seconds_per_prompt_and_seed": per_prompt,
        "bar": bar,
        "measured": measured,
        "values": {s: [round(float(x), 6) for x in v] for s, v in values.items()},
        "names": {"canaries": canaries, "ordinary": ordinary, "decoys": decoys, "reference": reference},
    }


def _measured(tb, pipe, prompts: list[str], copy_seeds, values: dict, parts: dict, pv: torch.Tensor) -> dict:
    """Copy rates of the scored prompts (canaries, ordinary, decoys), every signal against them, and the share of
    the copying and never-copied prompts the verdict (`pv`, p-values of the scored prompts) flags."""
    copies = prompt_copy_rates(tb, pipe, prompts, copy_seeds)
    flagged = pv[: len(prompts)] <= ALPHA
    exposures = {e: [i for i, c in enumerate(tb.canaries) if c[2] == e] for e in tb.exposures}
    groups = {**{f"canaries_{e}": i for e, i in exposures.items()},
              **{neg: list(range(part.start, part.stop)) for neg, part in parts.items()}}  # fmt: skip
    return {
        "copy_seeds": list(copy_seeds),
        "guidance": tb.guidance,
        "steps": COPY_STEPS,
        "copy_rate": {g: round(float(copies[i].mean()), 3) for g, i in groups.items()},
        "prompts_copying": {g: round(float((copies[i] >= COPYING).float().mean()), 3) for g, i in groups.items()},
        **measured_rows(
            {s: v[: len(prompts)] for s, v in values.items()}, copies, parts["decoys"], exposures[max(tb.exposures)]
        ),
        "flagged": {
            part: round(float(flagged[mask].float().mean()), 3) if mask.any() else None
            for part, mask in (("copying", copies >= COPYING), ("never_copied", copies == 0))
        },
        "copy_rates": [round(float(x), 4) for x in copies],
    }


def _evals(signal: str) -> int:
    from memctl.signals import EVALS

    return EVALS[signal]


def bench_detect(models: list[str], seeds: tuple[int, ...] = EVAL_SEEDS) -> dict:
    """Every model; the image testbeds also sampled for measured copying (`COPY_SEEDS`), the video one not."""
    return {name: bench_testbed(name, seeds) for name in models}


def detect_md(results: dict) -> list[str]:
    md = [
        "\nCanaries of each exposure against held-out ordinary prompts and against decoys: ROC AUC / TPR at 1 % "
        f"FPR. Flagged: p-value <= {ALPHA} against the reference half of the ordinary prompts plus decoys made from "
        "it (the default verdict; Student-t predictive tail, chosen in `bench/detect_verdict.py`). The combination "
        "(magnitude2 + contrast2 + sharpness) was chosen against measured copying on digits-s0 / digits-attr-s0 at "
        "seeds 0-7 (`bench/detect_measured.py`); digits-s1, digits-attr-s1, digits-s2 and moving-digits are clean "
        "tests. Under each table: every signal against *measured* copying (the image testbeds' prompts sampled at "
        "seeds 200-215), and the share of them the verdict flags.\n"
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
        if r.get("measured"):
            md += measured_md(r["measured"], exposures)
    return md


def _flagged_measured(m: dict) -> str:
    f = m.get("flagged") or {}
    cells = [f"{f[k]:.0%} of the {n}" for k, n in (("copying", "copying prompts"), ("never_copied", "never-copied"))
             if f.get(k) is not None]  # fmt: skip
    return f" Flagged: {' and '.join(cells)}." if cells else ""


def measured_md(m: dict, exposures: list[str]) -> list[str]:
    """The measured-ground-truth block of one model: copy rates by group, then each signal against them."""
    seeds = f"seeds {m['copy_seeds'][0]}-{m['copy_seeds'][-1]}"
    groups = [*(f"canaries_{e}" for e in exposures), "ordinary", "decoys"]
    names = [*(f"{e}× canaries" for e in exposures), "ordinary", "decoys"]
    rates = ", ".join(f"{n} {m['copy_rate'][g]:.0%} ({m['prompts_copying'][g]:.0%} of prompts copy)"
                      for n, g in zip(names, groups, strict=True))  # fmt: skip
    md = [f"\nMeasured ground truth ({len(m['copy_seeds'])} samples per prompt, {seeds}, guidance {m['guidance']}, "
          f"{m['steps']} steps; a sample copies when d1 < d2 / 3): copy rate {rates}. Copying prompts (copy rate >= "
          f"{COPYING:.0%}): {m['copying']}; never copied: {m['never_copied']}; decoys that never copied: "
          f"{m['clean_decoys']}." + _flagged_measured(m) + "\n\n"]  # fmt: skip
    head = ["signal", "copying vs never copied (AUC / TPR at 1 % FPR)",
            f"{exposures[-1]}× vs never-copying decoys (AUC)", "Spearman with copy rate"]  # fmt: skip
    md += [" | ".join(head) + "\n", " | ".join("---" for _ in head) + "\n"]
    for sig, row in m["rows"].items():
        copying = f"{row['auc_copying']:.2f} / {row['tpr1_copying']:.2f}" if "auc_copying" in row else "n/a"
        clean = f"{row['auc_vs_clean_decoys']:.2f}" if "auc_vs_clean_decoys" in row else "n/a"
        md.append(f"{sig} | {copying} | {clean} | {row['spearman_copy_rate']:.2f}\n")
    return md
