"""The detection verdict's reference and tail, chosen on the calibration models over several seed sets, then tested.

    python bench/detect_verdict.py   # -> bench/results/detect_verdict.{json,md}, about 3 min

Why several seed sets. A first choice made on one seed set (0-7) of the calibration models, the Student-t
predictive tail (`memctl.signals.p_values`) against the ordinary reference prompts alone (it flagged 16 of their 32
copying prompts and none of the 203 that never copied, nor any held-out ordinary prompt), was run through
`memctl bench detect` at the evaluation seeds (100-107; that state of the code was not committed): it flagged
29-61 % of the digits prompts that never copied and up to 40 % of the held-out ordinary prompts. The digits models'
ordinary prompts come in templates ("a five", "the digit five", "a handwritten five"), so their risks cluster: on
some seed draws about half of the reference risks fall within 0.2 of each other (digits-s0 at seeds 100-107: 8 of
15), the MAD collapses, and every prompt outside the cluster looks extreme. One seed set did not show it. So here
every candidate is read on four seed sets of the calibration models (digits-s0, digits-attr-s0; seeds 0-7, 8-15,
16-23, 24-31: neither the evaluation seeds 100-107 nor the label seeds), and the rule asks for the worst set.

- Prompts: as `memctl bench detect` (canaries, held-out ordinary prompts, the testbed's decoys, the reference half of
  the ordinary prompts, the decoys made from it), the default signals (`memctl.signals.COMBINED`, seeds in turn).
- Labels: copy rates from 16 samples per prompt: the calibration models' from `detect_measured.json` (seeds
  300-315), the test models' from `detect.json` (seeds 200-215). Copying: copy rate >= `COPYING`; never copied: 0.
- Candidates: the reference (ordinary prompts, or with the made decoys) times the tail (`TAILS`).
- Rule, fixed before the test models were read at the test seeds: the most copying prompts flagged (mean over seed
  sets, pooled over the calibration models), with at most 5 % of the never-copied prompts and at most 5 % of each
  model's held-out ordinary prompts flagged on *every* seed set; ties go to the first candidate in `TAILS` order.
- Test: digits-s1, digits-s2, digits-attr-s1 at fresh signal seeds 400-407 (never read before this script). The
  evaluation seeds 100-107 were read for the first choice (the MAD tail), and their reference risks were looked at
  while finding why it failed, so they are not a clean test of this one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from memctl.atomic import atomic_write
from memctl.detect_bench import COPYING, prompt_groups
from memctl.detection import robust_z
from memctl.signals import ALPHA, COMBINED, combine, p_values, read_signals, word_counts

RESULTS = Path(__file__).parent / "results"
CALIBRATION = ("digits-s0", "digits-attr-s0")
SEED_SETS = (tuple(range(0, 8)), tuple(range(8, 16)), tuple(range(16, 24)), tuple(range(24, 32)))
TEST = ("digits-s1", "digits-s2", "digits-attr-s1")
TEST_SEEDS = tuple(range(400, 408))
MAX_FLAGGED = 0.05


def _t(z: torch.Tensor, n: int) -> torch.Tensor:
    from scipy.stats import t as student_t

    return torch.from_numpy(student_t.sf(z.double().numpy(), df=max(n - 1, 1)))


def t_sd(risk: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The classical prediction tail: Student t around the mean, scale the standard deviation times sqrt(1 + 1/n)."""
    ref = ref.double()
    return _t((risk.double() - ref.mean()) / (ref.std() * (1 + 1 / ref.numel()) ** 0.5), ref.numel())


def normal_mad(risk: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Normal around the median, scale 1.4826 MAD (the verdict of stop 26, with the made decoys in the reference)."""
    return 0.5 * torch.special.erfc(robust_z(risk.double(), ref.double()) / 2**0.5)


TAILS = {
    "t, median and MAD": p_values,  # the first choice and the default (`memctl.signals`)
    "t, mean and sd": t_sd,
    "normal, median and MAD": normal_mad,
}


def read_risks(model: str, seeds) -> dict[str, torch.Tensor]:
    """Each group's combined risk (z-scores against the reference), read as `memctl bench detect` reads them: the
    scored prompts and the reference in one list, the made decoys in another."""
    from memctl.zoo import load_testbed

    tb = load_testbed(model)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    groups = prompt_groups(tb)
    counts, call = word_counts(groups["reference"]), dict(getattr(tb, "call_kwargs", {}))
    scored = [p for g, v in groups.items() if g != "made_decoys" for p in v]
    values = read_signals(pipe, scored, COMBINED, list(seeds), batch_size=32, counts=counts, **call)
    made = read_signals(pipe, groups["made_decoys"], COMBINED, list(seeds), batch_size=32, counts=counts, **call)
    start = len(scored) - len(groups["reference"])
    ref = {n: v[start:] for n, v in values.items()}
    risk = torch.cat([combine(values, ref), combine(made, ref)])
    out, i = {}, 0
    for g in [g for g in groups if g != "made_decoys"] + ["made_decoys"]:
        out[g] = risk[i : i + len(groups[g])]
        i += len(groups[g])
    return out


def flag_shares(risk: dict, rates: dict) -> dict:
    """Per candidate: flagged / counted among copying and never-copied prompts (every labelled group), the share of
    held-out ordinary prompts flagged and of made decoys flagged."""
    both = torch.cat([risk["reference"], risk["made_decoys"]])
    refs = {"ordinary": risk["reference"], "ordinary + made decoys": both}
    out = {}
    for ref_name, ref in refs.items():
        for tail_name, tail in TAILS.items():
            cell = {"copying": [0, 0], "never_copied": [0, 0]}
            for g, r in rates.items():
                flagged, rate = tail(risk[g], ref) <= ALPHA, torch.tensor(r)
                for part, mask in (("copying", rate >= COPYING), ("never_copied", rate == 0)):
                    cell[part][0] += int(flagged[mask].sum())
                    cell[part][1] += int(mask.sum())
            cell["ordinary"] = round(float((tail(risk["ordinary"], ref) <= ALPHA).float().mean()), 3)
            cell["made_decoys"] = round(float((tail(risk["made_decoys"], ref) <= ALPHA).float().mean()), 3)
            out[f"{ref_name}; {tail_name}"] = cell
    return out


def _share(pair: list[int]) -> float:
    return pair[0] / pair[1] if pair[1] else 0.0


def choose(calibration: dict) -> dict:
    """The rule of the module docstring over `{model: {seed set: flag_shares}}`."""
    names = list(next(iter(next(iter(calibration.values())).values())))
    rows = {}
    for name in names:
        per_set = []
        for s in range(len(SEED_SETS)):
            cells = [calibration[m][str(s)][name] for m in calibration]
            c = [sum(x["copying"][i] for x in cells) for i in (0, 1)]
            n = [sum(x["never_copied"][i] for x in cells) for i in (0, 1)]
            ordinary = max(x["ordinary"] for x in cells)
            per_set.append({"copying": _share(c), "never_copied": _share(n), "ordinary": ordinary})
        rows[name] = {
            "copying_flagged_mean": round(sum(p["copying"] for p in per_set) / len(per_set), 3),
            "never_copied_flagged_worst": round(max(p["never_copied"] for p in per_set), 3),
            "ordinary_flagged_worst": round(max(p["ordinary"] for p in per_set), 3),
        }
    worst = {k: max(r["never_copied_flagged_worst"], r["ordinary_flagged_worst"]) for k, r in rows.items()}
    ok = [k for k in rows if worst[k] <= MAX_FLAGGED]
    chosen = max(ok, key=lambda k: rows[k]["copying_flagged_mean"]) if ok else None
    return {"candidates": rows, "chosen": chosen}


def test_labels(model: str, detect: dict) -> dict[str, list[float]]:
    """Copy rates by group from `memctl bench detect`'s record: its scored order is the canaries in the testbed's
    order, the held-out ordinary prompts, the decoys."""
    from memctl.zoo import load_testbed

    m = detect["models"][model]
    rates, n, out = m["measured"]["copy_rates"], m["prompts"], {}
    k = n["canaries"]

    tb = load_testbed(model)
    exposures = [c[2] for c in tb.canaries]
    for e in tb.exposures:
        out[f"canaries_{e}"] = [rates[j] for j in range(k) if exposures[j] == e]
    i = k
    for g in ("ordinary", "decoys"):
        out[g] = rates[i : i + n[g]]
        i += n[g]
    return out


def markdown(result: dict) -> str:
    choice = result["choice"]
    lines = [
        "# The detection verdict, chosen over four calibration seed sets and tested at fresh seeds",
        "",
        f"`{result['command']}` ({result['seconds']:.0f} s). See the script's docstring for why and how. p <= "
        f"{ALPHA}; copying = copy rate >= {COPYING:.0%}; never copied = 0 copies in 16 samples.",
        "",
        f"## Choice on {', '.join(CALIBRATION)}, seed sets "
        + ", ".join(f"{s[0]}-{s[-1]}" for s in SEED_SETS)
        + f": **{choice['chosen']}**",
        "",
        "reference; tail | copying flagged (mean over sets) | never-copied flagged (worst set) | held-out ordinary "
        "flagged (worst set and model)",
        "--- | --- | --- | ---",
    ]
    for name, r in choice["candidates"].items():
        lines.append(f"{name} | {r['copying_flagged_mean']:.0%} | {r['never_copied_flagged_worst']:.0%} | "
                     f"{r['ordinary_flagged_worst']:.0%}")  # fmt: skip
    lines += ["", f"## Test: {', '.join(TEST)} at seeds {TEST_SEEDS[0]}-{TEST_SEEDS[-1]}", "",
              "model | reference; tail | copying flagged | never-copied flagged | held-out ordinary flagged | made "
              "decoys flagged", "--- | --- | --- | --- | --- | ---"]  # fmt: skip
    for model, cells in result["test"].items():
        for name, c in cells.items():
            mark = "**" if name == choice["chosen"] else ""
            (cf, cn), (nf, nn) = c["copying"], c["never_copied"]
            lines.append(
                f"{model} | {mark}{name}{mark} | {_share(c['copying']):.0%} ({cf} of {cn}) | "
                f"{_share(c['never_copied']):.0%} ({nf} of {nn}) | {c['ordinary']:.0%} | {c['made_decoys']:.0%}"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    measured = json.loads((RESULTS / "detect_measured.json").read_text())["models"]
    calibration = {}
    for model in CALIBRATION:
        rates = {g: v for g, v in measured[model]["copy_rate"].items() if g not in ("reference", "made_decoys")}
        calibration[model] = {str(i): flag_shares(read_risks(model, s), rates) for i, s in enumerate(SEED_SETS)}
    choice = choose(calibration)
    detect = json.loads((RESULTS / "detect.json").read_text())
    test = {m: flag_shares(read_risks(m, TEST_SEEDS), test_labels(m, detect)) for m in TEST}
    result = {
        "command": "python bench/detect_verdict.py",
        "seconds": round(time.perf_counter() - t0, 1),
        "seed_sets": [list(s) for s in SEED_SETS],
        "test_seeds": list(TEST_SEEDS),
        "calibration": calibration,
        "choice": choice,
        "test": test,
    }
    atomic_write(RESULTS / "detect_verdict.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write(RESULTS / "detect_verdict.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
