"""Neighbour contrasts for detection, tried on the calibration split (an exploration; not adopted).

    python bench/detect_neighbours.py   # -> bench/results/detect_neighbours.{json,md}, about 3 min

`contrast2` (`memctl.signals`) reads ‖ε(x, prompt) - ε(x, neighbour)‖ over the first two steps of a 4-step schedule,
the neighbour being the prompt without its last phrase. Memorization belongs to the exact prompt, so other
neighbours might separate memorized captions from merely unusual ones better. Tried here, each at the same cost (4
evaluations per prompt and seed), on digits-s0 and digits-attr-s0 at seeds 0-7 (the calibration split; the
evaluation models and seeds are not read):

- `dropfirst2`: the neighbour is the prompt without its first attribute phrase;
- `rotate2`: its attribute phrases in another order (the first moved to the end);
- `swap2`: its last phrase replaced by the most common other last phrase of the reference prompts.

Each alone and in the sets below, combined as `memctl.signals.combine` does (signal i on seeds i, i + k, ...),
scored like `bench/detect_measured.py`: ROC AUC of the prompts that copy (copy rate >= 25 %, the labels of
`bench/results/detect_measured.json`) against those that never copied, and of the most-exposed canaries against
the decoys, the decoys that never copied, and the held-out ordinary prompts. `magnitude2` and `sharpness` are
taken from `bench/results/detect_calibration.json`; `contrast2` is read again and checked against it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch

from memctl.atomic import atomic_write
from memctl.detect_bench import COPYING, prompt_groups
from memctl.detection import noise_differences, robust_z, roc_auc
from memctl.quiet import quiet
from memctl.signals import COMBINED, SCHEDULE, drop_last

RESULTS = Path(__file__).parent / "results"
MODELS = ("digits-s0", "digits-attr-s0")
SEEDS = tuple(range(8))
GUIDANCE = 7.5  # as `memctl.signals.read_signals` and the calibration readings
SETS = [("contrast2",), ("dropfirst2",), ("rotate2",), ("swap2",), ("contrast2", "dropfirst2"),
        ("contrast2", "swap2"), COMBINED, ("magnitude2", "contrast2", "dropfirst2"),
        ("contrast2", "dropfirst2", "sharpness"), ("magnitude2", "swap2", "sharpness")]  # fmt: skip


def _phrases(p: str) -> list[str]:
    return p.split(", ")


def drop_first(p: str, common) -> str:
    ph = _phrases(p)
    return ", ".join([ph[0], *ph[2:]]) if len(ph) > 2 else drop_last(p)


def rotate(p: str, common) -> str:
    ph = _phrases(p)
    return ", ".join([ph[0], *ph[2:], ph[1]]) if len(ph) > 2 else " ".join(p.split()[::-1])


def swap_last(p: str, common) -> str:
    ph = _phrases(p)
    alt = next((a for a, _ in common if a != ph[-1]), None) if len(ph) > 1 else None
    return ", ".join([*ph[:-1], alt]) if alt is not None else drop_last(p)


NEIGHBOURS = {"contrast2": lambda p, common: drop_last(p), "dropfirst2": drop_first, "rotate2": rotate,
              "swap2": swap_last}  # fmt: skip


def read(model: str) -> tuple[dict, dict]:
    """`{group: {signal: (S, P)}}` of the neighbour contrasts, and the groups' prompts."""
    from memctl.zoo import load_testbed

    tb = load_testbed(model)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    groups = prompt_groups(tb)
    common = Counter(_phrases(p)[-1] for p in groups["reference"] if len(_phrases(p)) > 1).most_common()
    prompts = [p for g in groups.values() for p in g]
    values = {}
    with quiet(pipe):
        for name, neighbour in NEIGHBOURS.items():
            negative = [neighbour(p, common) for p in prompts]
            per_seed = [
                noise_differences(
                    pipe, prompts, s, 2, GUIDANCE, num_inference_steps=SCHEDULE, negative_prompt=negative
                )
                .norm(dim=-1)
                .sum(1)
                for s in SEEDS
            ]
            values[name] = torch.stack(per_seed)
    out, start = {}, 0
    for g, ps in groups.items():
        out[g] = {n: v[:, start : start + len(ps)] for n, v in values.items()}
        start += len(ps)
    return out, groups


def risk(readings: dict, group: str, names: tuple[str, ...]) -> torch.Tensor:
    k = len(names)
    ref = {n: readings["reference"][n][i::k].mean(0).log() for i, n in enumerate(names)}
    z = [robust_z(readings[group][n][i::k].mean(0).log(), ref[n]) for i, n in enumerate(names)]
    return torch.stack(z).mean(0)


def score_sets(readings: dict, copies: dict, sets) -> dict:
    """Per set of signals: ROC AUC of the prompts that copy against those that never copied (every group but the
    reference; `copies`: copy rates per group), and of the 16x canaries against decoys, never-copying decoys and
    held-out ordinary prompts."""
    scored = [g for g in readings if g != "reference"]
    rate = torch.tensor([x for g in scored for x in copies[g]])
    never = torch.tensor(copies["decoys"]) == 0
    rows = {}
    for names in sets:
        r = {g: risk(readings, g, names) for g in readings}
        pooled = torch.cat([r[g] for g in scored])
        rows[" + ".join(names)] = {
            "copying": round(roc_auc(pooled[rate >= COPYING], pooled[rate == 0]), 3),
            "16x_vs_decoys": round(roc_auc(r["canaries_16"], r["decoys"]), 3),
            "16x_vs_never_copying_decoys": round(roc_auc(r["canaries_16"], r["decoys"][never]), 3)
            if never.any()
            else None,
            "16x_vs_ordinary": round(roc_auc(r["canaries_16"], r["ordinary"]), 3),
        }
    return rows


def table(rows: dict) -> list[str]:
    """The markdown table of `score_sets`' rows."""
    lines = [
        "signals | copying | 16× vs decoys | 16× vs never-copying decoys | 16× vs ordinary",
        "--- | --- | --- | --- | ---",
    ]
    for name, row in rows.items():
        lines.append(" | ".join([name, *["–" if v is None else f"{v:.2f}" for v in row.values()]]))
    return lines


def main() -> None:
    torch.set_num_threads(1)
    labels = json.loads((RESULTS / "detect_measured.json").read_text())["models"]
    stored = json.loads((RESULTS / "detect_calibration.json").read_text())
    result = {"command": "python bench/detect_neighbours.py", "seeds": list(SEEDS), "models": {}}
    t0 = time.perf_counter()
    for model in MODELS:
        readings, groups = read(model)
        old, check = stored[model]["groups"], 0.0
        for g in readings:
            if old[g]["prompts"] != groups[g]:
                raise ValueError(f"Expected the calibration readings' prompts for {model} {g}, but they differ.")
            check = max(check, float((readings[g]["contrast2"] - torch.tensor(old[g]["contrast2"])).abs().max()))
            readings[g].update({n: torch.tensor(old[g][n]) for n in ("magnitude2", "sharpness")})
        rows = score_sets(readings, labels[model]["copy_rate"], SETS)
        result["models"][model] = {"contrast2_max_difference_from_stored": check, "rows": rows}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save(result, "detect_neighbours", markdown(result))


def report(result: dict, title: str, extra=lambda m: []) -> str:
    """The markdown of a calibration-split run: `title`, the command, and per model `extra(m)` lines and the table."""
    lines = [
        f"# {title}",
        f"`{result['command']}` ({result['seconds']} s): digits-s0 and digits-attr-s0, seeds 0-7, 4 evaluations per "
        "prompt and seed for every set. ROC AUC: prompts that copy vs never copied (all groups but the reference) / "
        "16× canaries vs decoys / vs decoys that never copied / vs held-out ordinary prompts. The default is "
        f"{' + '.join(COMBINED)}.",
        "",
    ]
    for model, m in result["models"].items():
        lines += [f"## {model}", "", *extra(m), *table(m["rows"]), ""]
    return "\n".join(lines)


def save(result: dict, stem: str, markdown: str) -> None:
    atomic_write(RESULTS / f"{stem}.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write(RESULTS / f"{stem}.md", markdown.encode())
    print(markdown)


def markdown(result: dict) -> str:
    def read_again(m: dict) -> list[str]:
        difference = m["contrast2_max_difference_from_stored"]
        return [f"contrast2 read again: largest difference from the stored readings {difference:.1e}.", ""]

    return report(result, "Detection: neighbour contrasts on the calibration split", read_again)


if __name__ == "__main__":
    main()
