"""Memorization signals beside first-step magnitude, their combination, and a calibration without training data.

    >>> tb = memctl.zoo.load_testbed("digits")
    >>> canary = next(c[0] for c in tb.canaries if c[2] == 16)
    >>> scores = screen(tb.pipeline(), ["a two", canary], reference=tb.ordinary_prompts(), seeds=4)
    >>> sorted(scores[1].signals)
    ['contrast2', 'magnitude2', 'sharpness']
    >>> scores[1].risk > scores[0].risk
    True

Every signal is read from ordinary pipeline calls (`memctl.detection.noise_differences`: a root hook records
`δ = ε(x, prompt) - ε(x, negative)` and stops the call), so each works on every pipeline `memctl.detect` works on.
Costs (in brackets) are denoiser evaluations per prompt and seed; a guidance batch of two rows counts two.

- `magnitude` (2): ‖δ‖ at the first step (Wen et al., ICLR 2024).
- `magnitude2` (4): ‖δ‖ summed over the first two steps of a short schedule (`schedule` steps). The second step
  is at mid noise, on the model's own trajectory, where a memorized caption of ordinary words shows.
- `contrast2` (4): as `magnitude2`, with the prompt's own neighbour as the negative prompt: ‖ε(x, prompt) -
  ε(x, prompt without its last phrase)‖. Memorization belongs to the exact prompt; unusualness survives the edit.
- `perturb` (2): ‖ε(x, prompt) - ε(x, prompt with one letter of its rarest word changed)‖ at the first step.
- `anisotropy` (2): minus the cosine between δ and the unconditional prediction at low noise (the first timestep
  × 0.02) on pure noise (after Asthana & Belagiannis, ICLR 2026; the sign is the one seen on digits-s0).
- `sharpness` (4): ‖δ(x + hδ) - δ(x)‖ / h at the first step, a finite-difference Hessian-vector product of the
  conditional log-ratio (after Jeon et al., ICML 2025).

The default combination (`COMBINED`) gives the seeds in turn to `magnitude2`, `contrast2` and `sharpness`, so it
costs (4 + 4 + 4) / 3 = 4 evaluations per prompt and seed. How it was chosen: against *measured* copying, not the
prompts' groups. A group says what a prompt was trained as, not what it does: on the digits models an untrained tag
in the canary format makes the model draw canary images (the tag format itself is memorized), so those "decoys"
copy (19-31 % of their samples, `memctl bench detect`) and a detector that ranks them low misses real copies.
`bench/detect_measured.py` labels every prompt of the calibration split (digits-s0 and digits-attr-s0, signals at
seeds 0-7) by sampling it 16 times and scores every set of one to three signals of at most 4 evaluations by the ROC
AUC of the prompts that copy against those that never did; this set had the best mean AUC (0.968; `magnitude2` +
`contrast2` 0.966; the former default with `perturb` in place of `sharpness` 0.915). digits-s1, digits-attr-s1,
digits-s2 and moving-digits are the tests (`bench/results/detect.md`). `perturb` (ordinary > memorized > decoy
prompts) stays as a signal to read.

Calibration: each signal's log is a robust z-score against the user's ordinary prompts; `risk` is the mean of the
combined signals' z-scores. The reference for the verdict is the ordinary prompts **plus decoys made from them**
(words shuffled; one letter of the rarest word changed), so an odd but untrained prompt has odd company. `p_value`
is the Student-t predictive tail of `risk` against the reference's risks (median and MAD, a robust fit, widened for
the reference being a sample of `n`), the same meaning on every model and reachable with a small reference (an
empirical p-value needs 99 reference scores to reach 0.01); a prompt is flagged when `p_value <= alpha`.
How the verdict was chosen (`bench/detect_verdict.py`): on the calibration models at four seed sets, against
ordinary prompts alone every tail tried (normal or t, median and MAD or mean and sd) flagged 13 % of a model's
held-out ordinary prompts on some seed set: the embedded models' ordinary prompts come in templates ("a five",
"the digit five"), their risks cluster, and 15 of them do not pin down a 1 % tail. The made decoys are *quieter*
than ordinary prompts, so they widen the fit: the verdict is conservative (on digits it flags no prompt at the
test seeds, copying or not). Use the risk as a ranking; `screen(..., decoys=False)` judges against the ordinary
prompts alone, for a reference of many prompts of your own.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from memctl.defaults import ALPHA  # flag when the p-value against ordinary prompts and their decoys is <= this
from memctl.detection import PromptScore, condition_argument, noise_differences, robust_z
from memctl.quiet import quiet

EVALS = {"magnitude": 2, "magnitude2": 4, "contrast2": 4, "perturb": 2, "anisotropy": 2, "sharpness": 4}
SIGNALS = tuple(EVALS)
COMBINED = ("magnitude2", "contrast2", "sharpness")  # one per seed, in turn: 4 evaluations per prompt and seed
SCHEDULE = 4  # steps of the short schedule whose first two steps `magnitude2` / `contrast2` read
LOW_NOISE = 0.02  # `anisotropy`: the first timestep times this
SHARP_H = 0.1  # `sharpness`: finite-difference step along δ


def _words(prompt: str) -> list[str]:
    return prompt.replace(",", " ,").split()


def _join(words: list[str]) -> str:
    return " ".join(words).replace(" ,", ",")


def drop_last(prompt: str) -> str:
    """The prompt without its last comma-separated phrase (or its last word): "a two, tag hkb" -> "a two"."""
    parts = prompt.split(", ")
    if len(parts) > 1:
        return ", ".join(parts[:-1])
    return " ".join(prompt.split()[:-1])


def perturb(prompt: str, counts: Counter, rng: random.Random) -> str:
    """One letter of the prompt's rarest word changed (rarest in `counts`, then longest)."""
    words = _words(prompt)
    idx = [i for i, w in enumerate(words) if w != ","]
    if not idx:
        return prompt + "x"
    i = min(idx, key=lambda i: (counts.get(words[i], 0), -len(words[i]), -i))
    letters = list(words[i])
    j = rng.randrange(len(letters))
    letters[j] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != letters[j]])
    words[i] = "".join(letters)
    return _join(words)


def shuffle(prompt: str, rng: random.Random) -> str:
    """The prompt's words in a random order (commas dropped)."""
    words = prompt.replace(",", "").split()
    rng.shuffle(words)
    return " ".join(words)


def word_counts(prompts: list[str]) -> Counter:
    return Counter(w for p in prompts for w in re.findall(r"\w+", p))


def auto_decoys(reference: list[str], seed: int = 0) -> list[str]:
    """Untrained but odd prompts made from `reference`: each shuffled, and each with a letter changed."""
    rng, counts = random.Random(seed), word_counts(reference)
    made = [shuffle(p, rng) for p in reference] + [perturb(p, counts, rng) for p in reference]
    return [p for p in dict.fromkeys(made) if p not in set(reference)]


def _reading(pipe, prompts, seed, name, counts, guidance_scale, schedule, call_kwargs) -> torch.Tensor:
    """One signal for `prompts` under one seed: `(P,)`."""
    rng = random.Random(seed)
    short = {**call_kwargs, "num_inference_steps": schedule}
    if name == "magnitude":
        return noise_differences(pipe, prompts, seed, 1, guidance_scale, **call_kwargs)[:, 0].norm(dim=-1)
    if name in ("magnitude2", "contrast2"):
        if name == "contrast2":
            short["negative_prompt"] = [drop_last(p) for p in prompts]
        return noise_differences(pipe, prompts, seed, 2, guidance_scale, **short).norm(dim=-1).sum(1)
    if name == "perturb":
        short["negative_prompt"] = [perturb(p, counts, rng) for p in prompts]
        return noise_differences(pipe, prompts, seed, 1, guidance_scale, **short)[:, 0].norm(dim=-1)
    if name == "anisotropy":
        uncond: list = []
        d = noise_differences(pipe, prompts, seed, 1, guidance_scale, edit=_low_noise, uncond=uncond, **call_kwargs)
        u = uncond[0].reshape(-1, len(prompts), d.shape[-1])[-1]  # (P, F); two-call pipelines: one chunk
        return -torch.nn.functional.cosine_similarity(d[:, 0], u, dim=-1)
    if name == "sharpness":
        d = noise_differences(pipe, prompts, seed, 1, guidance_scale, **call_kwargs)[:, 0]  # (P, F)
        moved = noise_differences(pipe, prompts, seed, 1, guidance_scale, edit=_along(d), **call_kwargs)[:, 0]
        return (moved - d).norm(dim=-1) / SHARP_H
    raise ValueError(f"Expected a signal in {SIGNALS}, but got {name!r}.")


def _low_noise(x, t):
    return x, (t * LOW_NOISE).to(t.dtype) if isinstance(t, torch.Tensor) else type(t)(t * LOW_NOISE)


def _along(delta: torch.Tensor):
    def edit(x, t):
        p = delta.shape[0]
        step = delta.to(x.dtype).reshape(p, *x.shape[1:])
        return x + SHARP_H * step.repeat(x.shape[0] // p, *([1] * (x.ndim - 1))), t

    return edit


def read_signals(
    pipe,
    prompts: list[str],
    names: tuple[str, ...] = COMBINED,
    seeds: int | list[int] = 8,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    counts: Counter | None = None,
    schedule: int = SCHEDULE,
    split_seeds: bool | None = None,
    progress: bool = False,
    **call_kwargs,
) -> dict[str, torch.Tensor]:
    """`{signal: (P,)}`, each averaged over its seeds; `split_seeds` (default: for `COMBINED`) gives the signals
    the seeds in turn, so the combination costs what one 4-evaluation signal costs."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"Expected a non-empty list of prompt strings, but got {prompts!r:.200}.")
    unknown = [n for n in names if n not in SIGNALS]
    if unknown or not names:
        raise ValueError(f"Expected signals from {SIGNALS}, but got {list(names)!r}.")
    condition_argument(pipe, list(prompts))
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    split = tuple(names) == COMBINED if split_seeds is None else split_seeds
    if len(seed_list) < (len(names) if split else 1):
        raise ValueError(f"Expected at least {len(names) if split else 1} seeds, but got {seed_list}.")
    plan = [(s, [names[i % len(names)]] if split else list(names)) for i, s in enumerate(seed_list)]
    counts = counts if counts is not None else word_counts(list(prompts))
    chunks = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    values: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    bar = tqdm(total=sum(len(n) for _, n in plan) * len(chunks), desc="signals", disable=not progress)
    with quiet(pipe):
        for seed, todo in plan:
            for name in todo:
                parts = []
                for chunk in chunks:
                    parts.append(_reading(pipe, chunk, seed, name, counts, guidance_scale, schedule, call_kwargs))
                    bar.update()
                values[name].append(torch.cat(parts))
    bar.close()
    return {n: torch.stack(v).mean(0) for n, v in values.items()}


def _log(name: str, v: torch.Tensor) -> torch.Tensor:
    return v if name == "anisotropy" else v.clamp(min=1e-12).log()


def combine(values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over signals of the robust z-score of each signal (log, but for `anisotropy`) against `reference`."""
    return torch.stack([robust_z(_log(n, v), _log(n, reference[n])) for n, v in values.items()]).mean(0)


def p_values(risk: torch.Tensor, reference_risk: torch.Tensor) -> torch.Tensor:
    """One-sided p-value of each risk as a new draw beside the `n` reference risks: the Student-t predictive tail
    with `n - 1` degrees of freedom of the robust z-score (median, 1.4826 MAD) over `sqrt(1 + 1/n)`.

    The predictive tail accounts for the reference being a sample (against 15 ordinary prompts a normal tail
    flagged 8-27 % of held-out ordinary prompts at p <= 0.01, this one 5-7 %; `bench/results/detect_verdict.md`).
    It is not the
    empirical p-value (1 + #{ref >= risk}) / (1 + #ref), which cannot fall below 1 / (1 + #ref): with fewer than
    99 reference scores nothing could reach p <= 0.01. How well the tail holds is measured: `memctl bench detect`
    counts the held-out ordinary prompts, decoys and prompts that never copied that are flagged.
    """
    from scipy.stats import t as student_t

    n = reference_risk.numel()
    z = robust_z(risk.double(), reference_risk.double()) / (1 + 1 / n) ** 0.5
    return torch.from_numpy(student_t.sf(z.numpy(), df=max(n - 1, 1)))  # float64: small p-values stay above 0


def screen(
    pipe,
    prompts: list[str],
    reference: list[str],
    names: tuple[str, ...] = COMBINED,
    seeds: int | list[int] = 8,
    alpha: float = ALPHA,
    decoys: bool = True,
    **kwargs,
) -> list[PromptScore]:
    """Score `prompts` on `names` against ordinary `reference` prompts; the verdict is `p_value <= alpha` against
    them and the decoys made from them (`auto_decoys`); `decoys=False` judges against the ordinary prompts alone
    (for a large reference of your own: with 15 it does not hold its level, `bench/results/detect_verdict.md`)."""
    if not reference or isinstance(reference, str):
        raise ValueError(f"Expected a list of ordinary reference prompts, but got {reference!r:.200}.")
    if not 0 < alpha < 1:
        raise ValueError(f"Expected alpha in (0, 1), but got {alpha!r}.")
    reference = list(reference)
    made = auto_decoys(reference) if decoys else []
    counts = word_counts(reference)
    everything = list(prompts) + reference + made
    values = read_signals(pipe, everything, names, seeds, counts=counts, **kwargs)
    p, r = len(prompts), len(reference)
    ordinary = {n: v[p : p + r] for n, v in values.items()}
    risk = combine(values, ordinary)
    pv = p_values(risk[:p], risk[p:])  # against the reference and, with `decoys`, the decoys made from it
    out = []
    for i, prompt in enumerate(prompts):
        sig = {n: round(float(v[i]), 6) for n, v in values.items()}
        magnitude = sig.get("magnitude", sig.get("magnitude2", float("nan")))
        score = PromptScore(prompt, magnitude, float("nan"), float(risk[i]), bool(pv[i] <= alpha))
        out.append(replace(score, signals=sig, p_value=float(pv[i])))
    return out


def format_scores(scores: list[PromptScore], basis: str, cutoff: float) -> str:
    """The table `memctl detect` prints: risk, p-value, verdict, each signal, prompt; highest risk first."""
    names = list(scores[0].signals) if scores[0].signals else ["magnitude", "consistency"]
    width = min(60, max(len(str(s.prompt)) for s in scores))
    lines = [f"{'risk':>6}  {'p':>6}  {'flag':<4}  " + "  ".join(f"{n:>11}" for n in names) + "  prompt"]
    for s in sorted(scores, key=lambda s: -s.risk):
        values = s.signals or {"magnitude": s.magnitude, "consistency": s.consistency}
        p = "" if s.p_value is None else f"{s.p_value:.3f}"
        cells = "  ".join(f"{values[n]:>11.4g}" for n in names)
        lines.append(f"{s.risk:>6.2f}  {p:>6}  {'YES' if s.flagged else '':<4}  {cells}  {str(s.prompt)[:width]}")
    flagged = sum(s.flagged for s in scores)
    if scores[0].p_value is None:
        rule = f"risk > {cutoff}; risk is a robust z-score of log first-step magnitude against {basis}"
    else:
        rule = (f"p <= {cutoff}; risk is the mean robust z-score of the signals against {basis}, p its "
                "predictive (Student-t) tail against those prompts plus decoys made from them")  # fmt: skip
    return "\n".join(lines) + f"\n\n{flagged} of {len(scores)} flagged ({rule})."
