"""Does fidelity +1 raise the least-exposed canaries' copies? A test with the power the effect table lacks.

    python bench/fidelity_power.py digits-s0 digits-s1 digits-s2 --seeds 32

The effect bench samples each canary at 4 evaluation seeds, so the least-exposed (1×) canaries of a digits model give
32 samples per row and a copy rate of 3 % is one copy: the fidelity (+) check "least-exposed copied at least 1.5× as
often" cannot be told from seed noise there. This bench samples the canaries of the two lowest exposures at `--seeds`
evaluation seeds each (10,000 on, the effect bench's; no constant is chosen here) with the knob off and at +1 in each
fidelity mode (extra-pass guidance every step, cached every 10th step, in-attention guidance), and reports per
exposure:

- copies by the strict (d1/d2 < 1/3) and loose (< 1/2) criterion, with a 95 % interval (Wilson), and how many
  strict copies are of the canary's own bound image (a once-seen canary's "copies" are often of other images);
- the paired change in log distance to the canary's bound image, same prompt and seed with and without the knob,
  with a 95 % bootstrap interval over canaries (the distance is continuous, so it sees a push toward the bound
  image that moves few samples across a copy threshold).

Maps and γ as the effect bench makes them: the condition map probed from the testbed's probe set, the in-attention
gain calibrated on it (`memctl.attention_calibrate`). `--per-prompt` guides with γ per prompt
(`per_prompt_gain`, the map's `memctl.calibrate.gain_curve`; kept under "MODEL, per-prompt γ"), `--one-gain` adds
the one-γ rows beside it, `--factors` the curve at other factors; `--modes` picks the fidelity modes, `--gains` other
one-γ values. Output: `bench/results/fidelity_power.{json,md}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from memctl import metrics
from memctl.atomic import atomic_write
from memctl.attention_calibrate import attention_map
from memctl.effect import knob_setup, testbed_probes
from memctl.evaluate import EvalSpec, generate
from memctl.probe import probe

OUT = Path(__file__).parent / "results"
MODES = ("guidance", "cached", "attention")


def wilson(k: int, n: int) -> tuple[float, float]:
    """95 % Wilson interval of a rate of `k` in `n` (scipy's)."""
    ci = stats.binomtest(k, n).proportion_ci(method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_mean(per_canary: torch.Tensor, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of `per_canary` `(K, S)` and its 95 % percentile-bootstrap interval over canaries (scipy's; a canary's
    seeds stay together: each resample averages the means of K canaries drawn with replacement)."""
    means = per_canary.double().mean(1).numpy()
    ci = stats.bootstrap(
        (means,), np.mean, n_resamples=draws, method="percentile", rng=np.random.default_rng(seed)
    ).confidence_interval
    return float(means.mean()), float(ci.low), float(ci.high)


def measure(
    name: str, seeds: int, gains: tuple[float, ...] = (), seed_base: int = 10_000,
    modes: tuple[str, ...] = MODES, per_prompt: bool = False, one_gain: bool = False,
    factors: tuple[float, ...] = (), progress: bool = True,
) -> dict:  # fmt: skip
    from memctl.zoo import load_testbed

    torch.set_num_threads(1)
    tb = load_testbed(name)
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    probes = testbed_probes(tb)
    bmap = probe(pipe, probes, method="condition", progress=progress)
    amap = attention_map(pipe, bmap, probes)
    probe_s = time.perf_counter() - t0
    spec = EvalSpec(seeds=seeds, seed_base=seed_base, guidance=1.0, steps=25)
    low = sorted(tb.exposures)[:2]
    canaries = [c for c in tb.canaries if c[2] in low]
    prompts = [c[0] for c in canaries for _ in range(seeds)]
    seed_list = [spec.seed_base + s for _ in canaries for s in range(seeds)]
    bound = torch.stack([c[1] for c in canaries]).repeat_interleave(seeds, 0)
    train = tb.train_images
    curve = bmap.meta.get("fidelity_guidance_curve")
    if per_prompt and not curve:
        raise ValueError(f"Expected a per-prompt γ curve in the condition map of {name}, but the probe made none.")
    per = bmap.with_lever(per_prompt_gain=True) if per_prompt else bmap  # γ per prompt (memctl.calibrate.gain_curve)
    setups = {"plain": nullcontext}
    setups.update({f"+1 {m}": knob_setup(pipe, amap if m == "attention" else per, 1.0, m) for m in modes})
    if one_gain and per_prompt:  # the map's one γ for every prompt (the default)
        setups.update({f"+1 {m}, one γ": knob_setup(pipe, bmap, 1.0, m) for m in modes if m != "attention"})
    for k in factors if per_prompt else ():  # the curve at other factors than memctl.calibrate.CURVE_FACTOR
        kmap = dataclasses.replace(per, meta={**per.meta, "fidelity_guidance_curve": {**curve, "factor": k}})
        setups[f"+1 guidance, curve × {k:g}"] = knob_setup(pipe, kmap, 1.0, "guidance")
    for g in gains:  # the extra-pass guidance at other gains than the calibrated one: how recall responds to γ
        gmap = dataclasses.replace(bmap, meta={**bmap.meta, "fidelity_guidance": g})
        setups[f"+1 guidance, γ {g:g}"] = knob_setup(pipe, gmap, 1.0, "guidance")
    ordinary = tb.eval_prompts()
    n_ord = min(seeds, 8)
    ord_prompts = [p for p, _ in ordinary for _ in range(n_ord)]
    ord_seeds = [seed_base + s for _ in ordinary for s in range(n_ord)]
    rows, dist = {}, {}
    for label, setup in setups.items():
        t = time.perf_counter()
        with setup():
            x = generate(pipe, prompts, seed_list, spec)
            xo = generate(pipe, ord_prompts, ord_seeds, spec)
        seconds = time.perf_counter() - t
        d_bound = (x - bound).flatten(1).norm(dim=1).clamp_min(1e-6)
        dist[label] = d_bound
        row = {"seconds": round(seconds, 1), "ordinary_valid": _ordinary_valid(tb, xo, ordinary, n_ord)}
        for e in low:
            sel = torch.tensor([c[2] == e for c in canaries]).repeat_interleave(seeds)
            xs = x[sel]
            n = len(xs)
            index = metrics.copy_index(xs, train, 1 / 3)
            strict = int((index >= 0).sum())
            loose = int(round(metrics.copy_rate(xs, train, 1 / 2) * n))
            bound_copies = int(_copies_of(index, train, bound[sel]).sum())
            cell = {
                "n": n,
                "copies_1/3": strict,
                "copy_1/3": strict / n,
                "copy_1/3_ci": wilson(strict, n),
                "copies_1/2": loose,
                "copy_1/2": loose / n,
                "copy_1/2_ci": wilson(loose, n),
                "bound_copies_1/3": bound_copies,
                "mean_d_bound": float(d_bound[sel].mean()),
            }
            if label != "plain":
                change = (d_bound[sel].log() - dist["plain"][sel].log()).reshape(-1, seeds)
                cell["log_d_bound_change"] = bootstrap_mean(change)
            row[str(e)] = cell
        rows[label] = row
        if progress:
            print(name, label, json.dumps({k: v for k, v in row.items() if k != "seconds"})[:400], flush=True)
    return {
        "model": name,
        "seeds_per_canary": seeds,
        "exposures": low,
        "canaries": {str(e): sum(c[2] == e for c in canaries) for e in low},
        "gamma": {"guidance": bmap.meta.get("fidelity_guidance"), "attention": amap.meta.get("attention_guidance")},
        "per_prompt": per_prompt,
        "curve": curve,
        "curve_gamma": _curve_gammas(pipe, bmap, canaries, low) if per_prompt else None,
        "probe_seconds": round(probe_s, 1),
        "eval": spec.to_dict(),
        "ordinary_seeds": n_ord,
        "rows": rows,
    }


def _copies_of(index: torch.Tensor, train: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Bool `(N,)`: the sample copies (`metrics.copy_index` ≥ 0) its own canary's bound image, not another one."""
    hit = index >= 0
    same = torch.zeros_like(hit)
    same[hit] = (train[index[hit]] == bound[hit]).flatten(1).all(1)
    return same


def _curve_gammas(pipe, bmap, canaries: list, low: list) -> dict:
    """Mean and range of the per-prompt γ the curve gives the canaries of each exposure (`memctl.calibrate`)."""
    from memctl.calibrate import curve_gain, pull_size
    from memctl.probe import _encode_conditions

    with torch.no_grad():
        states = _encode_conditions(pipe, [c[0] for c in canaries]).float()
    gamma = curve_gain(bmap.meta["fidelity_guidance_curve"], pull_size(states, bmap.lever_tensors))
    out = {}
    for e in low:
        g = gamma[torch.tensor([c[2] == e for c in canaries])]
        out[str(e)] = [round(float(g.mean()), 4), round(float(g.min()), 4), round(float(g.max()), 4)]
    return out


def _ordinary_valid(tb, x: torch.Tensor, ordinary: list[tuple[str, int]], n: int) -> float:
    """Share of ordinary samples drawn as captioned: the digit, and on attribute testbeds every attribute too (the
    effect table's "ordinary valid")."""
    ok = tb.classify(x) == torch.tensor([c for _, c in ordinary]).repeat_interleave(n)
    if hasattr(tb, "attribute_correct"):
        ok &= torch.cat(
            [tb.attribute_correct(x[i * n : (i + 1) * n], *tb.combo_of(p)) for i, (p, _) in enumerate(ordinary)]
        )
    return float(ok.float().mean())


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def table(results: dict) -> str:
    lines = [
        "# Fidelity +1 on the least-exposed canaries, with power",
        "",
        "One CPU thread; each model's command and seconds under its heading. Copies: strict (d1/d2 < 1/3) and loose "
        "(< 1/2) with 95 % Wilson intervals ('k of its own': strict copies of the canary's own bound image, not "
        "another training image; in runs since the per-prompt γ); Δ log d: the paired change of the log distance to "
        "the bound image against the plain sample of the same prompt and seed, mean and 95 % bootstrap interval over "
        "canaries (negative = closer to the memorized image). The fidelity (+) check asks for the least-exposed "
        "copies at +1 to be at least 1.5× those at 0.",
        "",
    ]
    for name, r in results["models"].items():
        g = r["gamma"]
        lines += [
            f"## {name} ({r['seeds_per_canary']} seeds × "
            + ", ".join(f"{n} canaries at {e}×" for e, n in r["canaries"].items())
            + f"; γ guidance {g['guidance']:.4g}, in-attention {g['attention']:.4g})",
            "",
            f"`{r['command']}`, {r['seconds']:.0f} s.",
            "",
        ]
        if r.get("note"):
            lines += [f"Note: {r['note']}.", ""]
        if not r.get("per_prompt"):
            lines += ["Every `+1` row guides with the map's one γ (the default).", ""]
        if r.get("curve_gamma"):
            lines += [
                "γ per prompt in the `+1` rows (rows marked `one γ` and the runs without 'per-prompt γ' in their "
                "heading give every prompt the heading's γ): "
                + ", ".join(f"{e}× mean {v[0]:.3g} ({v[1]:.3g}–{v[2]:.3g})" for e, v in r["curve_gamma"].items())
                + f"; the curve's factor {r['curve']['factor']:.3g}, its general-probe cap ×"
                + f"{r['curve'].get('general_multiplier') or float('inf'):.3g} (`memctl.calibrate`).",
                "",
            ]
        head = ["row", f"ordinary valid ({r.get('ordinary_seeds', '–')} seeds)"]
        for e in r["exposures"]:
            head += [f"{e}× strict", f"{e}× loose", f"{e}× Δ log d"]
        lines += [" | ".join(head), " | ".join(["---"] * len(head))]
        for label, row in r["rows"].items():
            cells = [label, _pct(row["ordinary_valid"]) if "ordinary_valid" in row else "–"]
            for e in r["exposures"]:
                c = row[str(e)]
                lo, hi = c["copy_1/3_ci"]
                lo2, hi2 = c["copy_1/2_ci"]
                own = f"; {c['bound_copies_1/3']} of its own" if "bound_copies_1/3" in c else ""
                cells.append(f"{c['copies_1/3']}/{c['n']} = {_pct(c['copy_1/3'])} ({_pct(lo)}–{_pct(hi)}){own}")
                cells.append(f"{c['copies_1/2']}/{c['n']} = {_pct(c['copy_1/2'])} ({_pct(lo2)}–{_pct(hi2)})")
                if "log_d_bound_change" in c:
                    m, a, b = c["log_d_bound_change"]
                    cells.append(f"{m:+.3f} ({a:+.3f}, {b:+.3f})")
                else:
                    cells.append("–")
            lines.append(" | ".join(cells))
        lines.append("")
    return "\n".join(lines)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of seeds, but got {text!r}")
    return int(text)


def _gains(text: str) -> tuple[float, ...]:
    try:
        gains = tuple(float(g) for g in text.split(",") if g.strip())
    except ValueError:
        gains = ()
    if not gains or any(not g > 0 for g in gains):
        raise argparse.ArgumentTypeError(f"expected gains > 0 separated by commas (e.g. 0.5,1,2), but got {text!r}")
    return gains


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        expected = f"modes among {','.join(MODES)} separated by commas"
        raise argparse.ArgumentTypeError(f"expected {expected}, but got {text!r}")
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--seeds", type=_positive, default=32, help="evaluation seeds per canary")
    parser.add_argument("--gains", type=_gains, default=(), help="more γ for the extra-pass guidance, e.g. 0.5,1,2")
    parser.add_argument("--seed-base", type=int, default=10_000, help="first seed (probe-side: below 10,000)")
    parser.add_argument("--modes", type=_modes, default=MODES, help=f"fidelity modes at +1, of {','.join(MODES)}")
    parser.add_argument("--per-prompt", action="store_true", help="γ per prompt (per_prompt_gain) in the +1 rows")
    parser.add_argument("--one-gain", action="store_true", help="with --per-prompt: also each mode with one γ")
    parser.add_argument("--factors", type=_gains, default=(), help="with --per-prompt: the curve at more factors")
    args = parser.parse_args()
    if (args.one_gain or args.factors) and not args.per_prompt:
        parser.error("--one-gain and --factors compare with the per-prompt γ: give --per-prompt too")
    results = {"models": {}}
    path = OUT / "fidelity_power.json"
    if path.is_file():  # models measured earlier stay unless measured again
        results["models"] = json.loads(path.read_text())["models"]
    gains = args.gains
    for name in args.models:
        command = f"python bench/fidelity_power.py {name} --seeds {args.seeds}"
        command += f" --gains {','.join(f'{g:g}' for g in gains)}" if gains else ""
        command += f" --modes {','.join(args.modes)}" if args.modes != MODES else ""
        command += " --per-prompt" if args.per_prompt else ""
        command += " --one-gain" if args.one_gain else ""
        command += f" --factors {','.join(f'{k:g}' for k in args.factors)}" if args.factors else ""
        key = name  # evaluation seeds; a probe-side run is kept beside them
        if args.seed_base != 10_000:
            command += f" --seed-base {args.seed_base}"
            key = f"{name}, seeds {args.seed_base}+"
        t = time.perf_counter()
        record = measure(name, args.seeds, gains, args.seed_base, args.modes, args.per_prompt, args.one_gain,
                         args.factors)  # fmt: skip
        if args.per_prompt:  # kept beside the one-γ runs
            key += ", per-prompt γ"
        results["models"][key] = {**record, "command": command, "seconds": round(time.perf_counter() - t, 1)}
    atomic_write(path, (json.dumps(results, indent=1) + "\n").encode())
    atomic_write(OUT / "fidelity_power.md", (table(results) + "\n").encode())
    print(table(results))


if __name__ == "__main__":
    main()
