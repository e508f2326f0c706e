"""Candidate combinations of the detection signals, scored on the calibration split only.

    python bench/detect_calibrate.py      # the readings (digits-s0, digits-attr-s0, seeds 0-7)
    python bench/detect_combinations.py   # -> bench/results/detect_combinations.{json,md}

These are the candidates of the round before detection was scored against measured copying (`bench/detect_measured.py`,
which chose today's `memctl.signals.COMBINED`); they trade the AUC against the groups "decoys" and "ordinary", and
the script stays to reproduce that table. Each candidate gets the seeds as the former default (`PREVIOUS`,
`magnitude2` + `contrast2` + `perturb`) did (signal i of `PREVIOUS` on seeds i, i + 3, ...), so
every row costs 3.33 denoiser evaluations per prompt and seed. The candidates, all from z-scores of logs against
the reference half of the ordinary prompts (as `memctl.signals.combine`):
- `mean` (the former default, `PREVIOUS`): the mean of the three z-scores;
- `strength`: the mean of `magnitude2` and `contrast2` only;
- `perturb weight c`: `strength` plus c times `perturb`'s z-score (the former default, the mean of three, ranks
  as c = 0.5);
- `veto T`: `strength`, minus 10 per unit that `perturb`'s z-score falls below T. A memorized prompt's rarest word
  matters to the model (changing a letter of it moves the prediction), an untrained one's does not, so a low
  `perturb` marks a decoy; above T, `perturb` does not count, and ordinary prompts keep their `strength` order;
- `and`: the smaller of `strength` and `perturb`'s z-score against the decoys made from the reference
  (`auto_decoys`): high only for a prompt that stands out from ordinary prompts and from made-up odd ones.
Rows: ROC AUC of the canaries of each exposure against the held-out ordinary prompts and against the decoys; the
share flagged at p <= `ALPHA` against the reference and the made decoys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memctl.detection import robust_z, roc_auc
from memctl.signals import ALPHA, p_values

RESULTS = Path(__file__).parent / "results"
THRESHOLDS = (-2.0, -4.0, -6.0, -8.0)
WEIGHTS = (0.1, 0.2, 0.3, 0.5, 1.0)
PREVIOUS = ("magnitude2", "contrast2", "perturb")  # the default combination when this table was made


def _log(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(min=1e-12).log()


def candidates(groups: dict, seeds: int) -> dict:
    """`{candidate: {group: scores}}` from per-seed readings, the seeds split over `PREVIOUS` in turn."""
    split = {s: list(range(i, seeds, len(PREVIOUS))) for i, s in enumerate(PREVIOUS)}

    def z(sig: str, group: str, ref: str = "reference") -> torch.Tensor:
        mean = {g: torch.tensor(groups[g][sig])[split[sig]].mean(0) for g in (group, ref)}
        return robust_z(_log(mean[group]), _log(mean[ref]))

    def strength(g):
        return (z("magnitude2", g) + z("contrast2", g)) / 2

    found = {
        "mean": lambda g: (z("magnitude2", g) + z("contrast2", g) + z("perturb", g)) / 3,
        "strength": strength,
        **{f"perturb weight {c:g}": (lambda g, c=c: strength(g) + c * z("perturb", g)) for c in WEIGHTS},
        **{f"veto {t:g}": (lambda g, t=t: strength(g) - 10 * (t - z("perturb", g)).clamp(min=0)) for t in THRESHOLDS},
        "and": lambda g: torch.minimum(strength(g), z("perturb", g, "made_decoys")),
    }
    return {name: {g: f(g) for g in groups} for name, f in found.items()}


def rows(groups: dict, seeds: int) -> dict:
    exposures = sorted(int(k.split("_")[1]) for k in groups if k.startswith("canaries_"))
    out = {}
    for name, parts in candidates(groups, seeds).items():
        ref = torch.cat([parts["reference"], parts["made_decoys"]])
        row = {}
        for e in exposures:
            c = parts[f"canaries_{e}"]
            row[f"{e}x"] = {neg: round(roc_auc(c, parts[neg]), 3) for neg in ("ordinary", "decoys")}
        row["flagged"] = {
            g: round(float((p_values(parts[g], ref) <= ALPHA).float().mean()), 3)
            for g in ("decoys", "ordinary", f"canaries_{exposures[-1]}")
        }
        out[name] = row
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Detection: candidate combinations on the calibration split",
        "`python bench/detect_calibrate.py` then `python bench/detect_combinations.py`: "
        "digits-s0 and digits-attr-s0 at seeds 0-7 (never the bench's evaluation seeds). "
        "ROC AUC vs held-out ordinary prompts / vs decoys; flagged at p <= 0.01.",
    ]
    for model, table in result.items():
        lines += ["", f"## {model}", ""]
        first = next(iter(table.values()))
        exps = [k for k in first if k != "flagged"]
        lines.append(" | ".join(["candidate", *[f"{e} vs ordinary / decoys" for e in exps], "flagged decoys"]))
        lines.append(" | ".join(["---"] * (len(exps) + 2)))
        for name, row in table.items():
            cells = [f"{row[e]['ordinary']:.2f} / {row[e]['decoys']:.2f}" for e in exps]
            lines.append(" | ".join([name, *cells, f"{100 * row['flagged']['decoys']:.0f} %"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    readings = json.loads((RESULTS / "detect_calibration.json").read_text())
    result = {m: rows(r["groups"], len(r["seeds"])) for m, r in readings.items() if not m.startswith("_")}
    (RESULTS / "detect_combinations.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "detect_combinations.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
