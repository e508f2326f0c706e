"""The Detect tab's text in and table out: prompts from a textbox, `memctl.detect` scores to a sorted table.

>>> parse_prompts("# canaries\\na two, tag hkb\\n\\n  a two  \\n")
['a two, tag hkb', 'a two']
>>> from memctl.detection import PromptScore
>>> table = score_table([PromptScore("a two", 0.2154, 0.902, -0.5, False),
...                      PromptScore("a two, tag hkb", 0.3564, 0.9005, 3.86, True)])
>>> table["headers"], table["data"][0]
(['risk', 'flagged', 'magnitude', 'consistency', 'prompt'], [3.86, True, 0.3564, 0.9005, 'a two, tag hkb'])

With `memctl.signals.screen` scores beside them, the table adds the default signals, the p-value and a verdict
("memorized": p <= alpha; "unusual": flagged by magnitude only; "ordinary"):

>>> nan = float("nan")
>>> screened = [PromptScore("a two", 5.1, nan, 0.7, False, {"magnitude2": 5.1, "contrast2": 4.6, "sharpness": 3}, 0.4),
...             PromptScore("a two, tag hkb", 7.4, nan, 4.2, False,
...                         {"magnitude2": 7.4, "contrast2": 5.9, "sharpness": 2.1}, 0.04)]
>>> table = score_table([PromptScore("a two", 0.2154, 0.902, -0.5, False),
...                      PromptScore("a two, tag hkb", 0.3564, 0.9005, 3.86, True)], screened)
>>> table["headers"][-6:]
['magnitude2', 'contrast2', 'sharpness', 'p', 'verdict', 'prompt']
>>> table["data"][0][-6:]
[7.4, 5.9, 2.1, 0.04, 'unusual', 'a two, tag hkb']
"""

from __future__ import annotations

from memctl.defaults import ALPHA
from memctl.detection import prompt_lines
from memctl.signals import COMBINED

MAX_PROMPTS = 200  # one request holds the model's lock; more prompts belong in `memctl detect PROMPTS.txt`
MAX_SEEDS = 64
MIN_SEEDS = len(COMBINED)  # the verdict's signals take one seed each, in turn
HEADERS = ["risk", "flagged", "magnitude", "consistency", "prompt"]
FULL_HEADERS = ["risk", "flagged", "magnitude", "consistency", *COMBINED, "p", "verdict", "prompt"]
DATATYPES = ["number", "bool", "number", "number", *["number"] * len(COMBINED), "number", "str", "str"]
EMPTY_TABLE = {"headers": FULL_HEADERS, "data": [[""] * (len(FULL_HEADERS) - 1) + ["(press Score prompts)"]]}


def parse_prompts(text) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped (as in `memctl detect`)."""
    if not isinstance(text, str):
        raise ValueError(f"Expected the prompts as text (one per line), but got {type(text).__name__}.")
    prompts = prompt_lines(text)
    if not prompts:
        raise ValueError(
            "Expected at least one prompt (one per line; blank and '#' lines are skipped), but got "
            "none. Type a few prompts, e.g. a suspected one and an ordinary one."
        )
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(
            f"Expected at most {MAX_PROMPTS} prompts per request, but got {len(prompts)}. Split them, "
            "or run `memctl detect PROMPTS.txt` for a long list."
        )
    return prompts


def default_prompts(testbed) -> str:
    """The textbox's text for an embedded model: its two most exposed canaries, then their classes' prompts."""
    canaries = sorted(testbed.canaries, key=lambda c: -c[2])[:2]  # (prompt, image, exposure, class id)
    return "\n".join(
        [
            "# canaries (memorized on purpose)",
            *[c[0] for c in canaries],
            "# ordinary prompts",
            *[testbed.prompt(c[3]) for c in canaries],
        ]
    )


def score_table(scores, screened=None) -> dict:
    """`{"headers", "data"}` of `PromptScore`s, highest risk first; `screened`: `memctl.signals.screen` scores of
    the same prompts, whose signals, p-value and verdict join each row."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i].risk)
    data = []
    for i in order:
        s = scores[i]
        row = [round(s.risk, 2), s.flagged, round(s.magnitude, 4), round(s.consistency, 4)]
        if screened is not None:
            v = screened[i]
            verdict = "memorized" if v.flagged else "unusual" if s.flagged else "ordinary"
            row += [round(v.signals[n], 4) for n in COMBINED] + [round(v.p_value, 3), verdict]
        data.append([*row, s.prompt])
    return {"headers": HEADERS if screened is None else FULL_HEADERS, "data": data}


def summary(scores, reference: int | None, threshold: float, note: str = "", screened=None) -> str:
    """One line: how many were flagged, and what risk is measured against."""
    flagged = sum(s.flagged for s in scores)
    against = (
        f"the model's {reference} ordinary prompts"
        if reference
        else "the scored prompts themselves (score a dozen or more for a stable median)"
    )
    return (
        f"**{flagged} of {len(scores)}** prompts flagged (risk > {threshold:g}). Risk = robust z-score (median, "
        f'MAD) of the log magnitude of the prompt\'s pull ‖ε(x, prompt) − ε(x, "")‖ at the first denoising '
        f"step, against {against}. Consistency = mean cosine of that pull across seeds (shown, not used to "
        f"flag).{note}" + ("" if screened is None else _screen_note(screened))
    )


def _screen_note(screened) -> str:
    n = sum(s.flagged for s in screened)
    return (
        f" **Verdict: {n} of {len(screened)} memorized** (p <= {ALPHA:g}). magnitude2 = the pull over the first two "
        "steps of a 4-step schedule; contrast2 = the pull beyond the prompt's own neighbour (the prompt without its "
        "last phrase); sharpness = how fast the pull changes when the noise moves along it; p = the predictive "
        "(Student-t) tail p-value of their mean robust z-score against the ordinary prompts plus decoys made from "
        "them (`memctl.signals`). *unusual* = flagged by magnitude, not memorized by the verdict."
    )
