"""The interaction of a prompt's parts as a detection signal, tried on the calibration split (an exploration).

    python bench/detect_interaction.py   # -> bench/results/detect_interaction.{json,md}, about 4 min

Memorization on digits-attr is a property of one exact caption of ordinary words: every part was trained on many
images, only the whole is bound to one. Composable diffusion (Liu et al. 2022) predicts a caption's noise from its
parts when they are independent given the sample. So what the whole adds beyond its parts, the *interaction*

    I(c) = [ε(c) - ε(c without its last phrase)] - [ε(last phrase's context) - ε(base)]

should be large for a memorized caption and small for a merely unusual one (a never-shown combination that the
model composes). Two splits, each 4 evaluations per prompt and seed (two first-step readings of `noise_differences`,
the prompt against a negative prompt; seeds in turn as `memctl.signals.combine` does for one signal):

- `interaction`: the subject is a part like the others: base "" (unconditional), context = the last phrase alone;
- `interaction_s`: the subject is common: base = the first phrase, context = first + last phrase. Prompts of one
  phrase split at their last word.

Scored like `bench/detect_neighbours.py` on digits-s0 and digits-attr-s0 at seeds 0-7 (the calibration split; no
evaluation model or seed is read), alone and beside the default `memctl.signals.COMBINED`, with the copy labels of
`bench/results/detect_measured.json`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from memctl.detect_bench import prompt_groups
from memctl.detection import noise_differences
from memctl.quiet import quiet
from memctl.signals import COMBINED, drop_last

sys.path.insert(0, str(Path(__file__).parent))
from detect_neighbours import report, save, score_sets  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = ("digits-s0", "digits-attr-s0")
SEEDS = tuple(range(8))
GUIDANCE = 7.5  # as `memctl.signals.read_signals` and the calibration readings
SETS = [("interaction",), ("interaction_s",), ("contrast2",), COMBINED, ("magnitude2", "interaction_s", "sharpness"),
        ("magnitude2", "contrast2", "interaction_s"), ("contrast2", "interaction_s")]  # fmt: skip


def split(prompt: str, subject_common: bool) -> tuple[str, str, str]:
    """(prompt without its last part, the last part's context, the base) for `I(c)`."""
    phrases = prompt.split(", ")
    rest = drop_last(prompt)
    if len(phrases) > 1:
        last, first = phrases[-1], phrases[0]
    else:
        words = prompt.split()
        last, first = words[-1], " ".join(words[:-1])
    if subject_common and len(phrases) > 2:
        return rest, f"{first}, {last}", first
    return rest, last, ""


def reading(pipe, prompts: list[str], seed: int, subject_common: bool) -> torch.Tensor:
    """‖I(c)‖ of the first step under one seed: `(P,)`."""
    parts = [split(p, subject_common) for p in prompts]
    whole = noise_differences(pipe, prompts, seed, 1, GUIDANCE, negative_prompt=[r for r, _, _ in parts])
    contexts, bases = [c for _, c, _ in parts], [b for *_, b in parts]
    context = noise_differences(pipe, contexts, seed, 1, GUIDANCE, negative_prompt=bases)
    return (whole[:, 0] - context[:, 0]).norm(dim=-1)


def main() -> None:
    from memctl.zoo import load_testbed

    torch.set_num_threads(1)
    labels = json.loads((RESULTS / "detect_measured.json").read_text())["models"]
    stored = json.loads((RESULTS / "detect_calibration.json").read_text())
    result = {"command": "python bench/detect_interaction.py", "seeds": list(SEEDS), "models": {}}
    t0 = time.perf_counter()
    for model in MODELS:
        tb = load_testbed(model)
        pipe = tb.pipeline()
        pipe.set_progress_bar_config(disable=True)
        groups = prompt_groups(tb)
        prompts = [p for g in groups.values() for p in g]
        values = {}
        with quiet(pipe):
            for name, common in (("interaction", False), ("interaction_s", True)):
                values[name] = torch.stack([reading(pipe, prompts, s, common) for s in SEEDS])
        readings, start = {}, 0
        for g, ps in groups.items():
            if stored[model]["groups"][g]["prompts"] != ps:
                raise ValueError(f"Expected the calibration readings' prompts for {model} {g}, but they differ.")
            readings[g] = {n: v[:, start : start + len(ps)] for n, v in values.items()}
            readings[g].update({n: torch.tensor(stored[model]["groups"][g][n]) for n in COMBINED})
            start += len(ps)
        rows = score_sets(readings, labels[model]["copy_rate"], SETS)
        result["models"][model] = {"rows": rows}
        print(model, json.dumps(rows, indent=1), flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save(result, "detect_interaction", markdown(result))


def markdown(result: dict) -> str:
    return report(result, "Detection: the interaction of a prompt's parts, on the calibration split")


if __name__ == "__main__":
    main()
