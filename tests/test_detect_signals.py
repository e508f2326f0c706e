"""memctl.signals (signals beside magnitude, calibration) and memctl.detect_bench's measures."""

import doctest
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from tiny import tiny_pipeline

import memctl
import memctl.signals
import memctl.zoo
from memctl.detect_bench import measured_md, measured_rows, prompt_copy_rates, split_ordinary, tpr_at_fpr
from memctl.detection import noise_differences
from memctl.signals import (
    COMBINED,
    EVALS,
    SIGNALS,
    auto_decoys,
    combine,
    drop_last,
    p_values,
    perturb,
    read_signals,
    screen,
    shuffle,
    word_counts,
)

CALL = {"height": 8, "width": 8}  # the tiny SD pipeline's image size


def test_neighbours_by_hand():
    assert drop_last("a two, tag hkb") == "a two"
    assert drop_last("a zero, small, bold, leaning left") == "a zero, small, bold"
    assert drop_last("a seven") == "a"
    counts = word_counts(["a two", "a seven", "a two, small"])
    changed = perturb("a two, tag hkb", counts, random.Random(0))
    words, before = changed.split(), "a two, tag hkb".split()
    diff = [i for i, (a, b) in enumerate(zip(words, before, strict=True)) if a != b]
    assert len(diff) == 1
    assert before[diff[0]] in ("tag", "hkb")  # a word the reference never uses
    assert sum(x != y for x, y in zip(words[diff[0]], before[diff[0]], strict=True)) == 1  # one letter
    assert sorted(shuffle("a two, tag hkb", random.Random(1)).split()) == sorted(["a", "two", "tag", "hkb"])
    made = auto_decoys(["a two", "a seven"])
    assert made
    assert not set(made) & {"a two", "a seven"}


def test_p_values_and_combine_by_hand():
    ref = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # median 2, MAD 1: z = (risk - 2) / 1.4826, over sqrt(1 + 1/5)
    t4 = 3.746947  # Student t, 4 degrees of freedom: upper 1 % point
    p = p_values(torch.tensor([2.0, 2.0 + 1.4826 * t4 * 1.2**0.5, 2.0 + 1.4826 * 10]), ref)
    assert p.tolist() == pytest.approx([0.5, 0.01, 3.995e-4], rel=1e-3)
    assert p.dtype == torch.float64
    assert p_values(torch.tensor([30.0]), torch.arange(15.0))[0] < 0.01  # reachable with 15 reference scores
    z = 2.5  # beyond the normal 1 % point (2.326) but not the predictive one for 15 references: not flagged
    assert p_values(torch.tensor([7.0 + z * 4 * 1.4826]), torch.arange(15.0))[0] > 0.01
    values = {"magnitude2": torch.tensor([math_e := 2.718281828, 1.0]), "anisotropy": torch.tensor([0.5, 0.0])}
    reference = {"magnitude2": torch.tensor([1.0, 1.0, math_e**2]), "anisotropy": torch.tensor([-1.0, 0.0, 1.0])}
    # log magnitude: median 0, MAD 0 -> floored; anisotropy raw: median 0, MAD 1 -> z 0.5 / 1.4826
    z = combine(values, reference)
    assert z[1] == pytest.approx(0.0)
    assert z[0] > 1e3  # the floored MAD makes any excess large: the floor is not silent about a flat reference


def test_tpr_at_one_percent_fpr_and_the_ordinary_split():
    neg = torch.arange(10.0)  # 1 % of 10 negatives: none may pass, so the threshold is the largest, 9
    assert tpr_at_fpr(torch.tensor([9.5, 9.0, 12.0, 1.0]), neg) == 0.5
    neg = torch.arange(200.0)  # 2 of 200 may pass: threshold 197
    assert tpr_at_fpr(torch.tensor([197.5, 197.0]), neg) == 0.5
    ref, held = split_ordinary([f"p{i}" for i in range(7)])
    assert len(ref) == 3
    assert len(held) == 4
    assert not set(ref) & set(held)


def test_measured_rows_by_hand():
    # prompts 0-1 canaries, 2-3 ordinary, 4-6 decoys; prompt 4 (a decoy) copies, 5 copies once in 8
    copies = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.75, 0.125, 0.0])
    values = {"loud": torch.tensor([9.0, 8.0, 1.0, 2.0, 7.0, 3.0, 4.0]), "quiet": -torch.arange(7.0)}
    m = measured_rows(values, copies, slice(4, 7), most=[0, 1])
    assert (m["copying"], m["never_copied"], m["clean_decoys"]) == (3, 3, 1)  # 0.125 is neither
    loud = m["rows"]["loud"]
    assert loud["auc_copying"] == 1.0  # 9, 8, 7 above 1, 2, 4
    assert loud["auc_vs_clean_decoys"] == 1.0  # only prompt 6 is a decoy that never copied
    assert m["rows"]["quiet"]["auc_copying"] == pytest.approx(7 / 9, abs=1e-3)  # (0, -1, -4) vs (-2, -3, -6)
    assert loud["spearman_copy_rate"] > 0.8 > m["rows"]["quiet"]["spearman_copy_rate"]
    block = "".join(measured_md({"copy_seeds": [200, 201], "guidance": 1.0, "steps": 25, "copy_rate": {
        "canaries_16": 0.75, "ordinary": 0.0, "decoys": 0.29}, "prompts_copying": {"canaries_16": 1.0, "ordinary": 0.0,
        "decoys": 0.33}, **m}, ["16"]))  # fmt: skip
    assert "decoys 29% (33% of prompts copy)" in block
    assert "loud | 1.00 / 1.00 | 1.00 |" in block
    assert "Flagged:" not in block  # no verdict recorded: nothing said about it
    m["flagged"] = {"copying": 0.5, "never_copied": 0.0}
    block = "".join(measured_md({"copy_seeds": [200, 201], "guidance": 1.0, "steps": 25, "copy_rate": {
        "canaries_16": 0.75, "ordinary": 0.0, "decoys": 0.29}, "prompts_copying": {"canaries_16": 1.0, "ordinary": 0.0,
        "decoys": 0.33}, **m}, ["16"]))  # fmt: skip
    assert "Flagged: 50% of the copying prompts and 0% of the never-copied." in block


def test_the_verdict_rule_takes_the_worst_seed_set():
    """`bench/detect_verdict.py`'s rule: a candidate that flags too many ordinary prompts on one seed set is out,
    however well it does on the others."""
    path = Path(__file__).parents[1] / "bench" / "detect_verdict.py"
    spec = importlib.util.spec_from_file_location("detect_verdict", path)
    verdict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdict)

    def cell(copying, never, ordinary):
        return {"copying": copying, "never_copied": never, "ordinary": ordinary, "made_decoys": 0.0}

    good = {"loud": cell([9, 10], [0, 50], 0.0), "quiet": cell([1, 10], [0, 50], 0.0)}
    bad = {"loud": cell([9, 10], [0, 50], 0.2), "quiet": cell([1, 10], [0, 50], 0.0)}
    sets = {str(i): good for i in range(len(verdict.SEED_SETS))}
    assert verdict.choose({"m": sets})["chosen"] == "loud"
    sets["2"] = bad  # one seed set flags 20 % of the held-out ordinary prompts
    out = verdict.choose({"m": sets})
    assert out["chosen"] == "quiet"
    assert out["candidates"]["loud"]["ordinary_flagged_worst"] == 0.2
    assert out["candidates"]["loud"]["copying_flagged_mean"] == 0.9


def test_copy_rates_sample_the_testbed_as_it_is_evaluated():
    tb = memctl.zoo.load_testbed("digits")
    canary = max(tb.canaries, key=lambda c: c[2])[0]  # bound to one image, seen 16 times
    rates = prompt_copy_rates(tb, tb.pipeline(), [canary, "a two"], seeds=[200, 201])
    assert rates.tolist() == [1.0, 0.0]  # the memorized prompt draws its image; the ordinary one draws new twos


def test_contrast_reads_the_neighbour_as_the_negative_prompt():
    pipe = tiny_pipeline("sd")
    prompts = ["ab ba, aa", "ba"]
    out = read_signals(pipe, prompts, ("contrast2", "magnitude2"), seeds=[3], split_seeds=False, **CALL)
    d = noise_differences(pipe, prompts, 3, 2, 7.5, negative_prompt=["ab ba", ""], num_inference_steps=4, **CALL)
    assert torch.allclose(out["contrast2"], d.norm(dim=-1).sum(1))
    plain = noise_differences(pipe, prompts, 3, 2, 7.5, num_inference_steps=4, **CALL)
    assert torch.allclose(out["magnitude2"], plain.norm(dim=-1).sum(1))
    assert not torch.allclose(out["contrast2"], out["magnitude2"])
    assert memctl.list_hooks(pipe.unet) == []


def test_every_signal_is_finite_and_the_probes_see_what_they_ask_for():
    pipe = tiny_pipeline("sd")
    seen = []  # timesteps inside the denoiser, after memctl's root hook has edited the call
    handle = pipe.unet.time_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten()[0]))
    out = read_signals(pipe, ["ab", "ba"], SIGNALS, seeds=[0, 1], split_seeds=False, **CALL)
    handle.remove()
    assert set(out) == set(SIGNALS)
    assert all(v.shape == (2,) and bool(torch.isfinite(v).all()) for v in out.values())
    assert bool(out["anisotropy"].abs().le(1 + 1e-6).all())
    first = seen[0]
    assert any(float(t) == pytest.approx(float(first) * memctl.signals.LOW_NOISE, abs=1) for t in seen)
    assert memctl.list_hooks(pipe.unet) == []


def test_the_combination_gives_the_seeds_in_turn():
    pipe = tiny_pipeline("sd")
    seeds, k = [0, 1, 2, 3, 4, 5], len(COMBINED)
    every = read_signals(pipe, ["ab", "ba"], COMBINED, seeds=seeds, **CALL)
    for i, name in enumerate(COMBINED):
        alone = read_signals(pipe, ["ab", "ba"], (name,), seeds=seeds[i::k], **CALL)
        assert torch.equal(every[name], alone[name])
    assert sum(EVALS[n] for n in COMBINED) / len(COMBINED) <= 4
    with pytest.raises(ValueError, match="signals from"):
        read_signals(pipe, ["ab"], ("loudness",), seeds=2, **CALL)
    with pytest.raises(ValueError, match=f"at least {len(COMBINED)} seeds"):
        read_signals(pipe, ["ab"], COMBINED, seeds=[0], **CALL)


def test_screen_judges_against_the_ordinary_prompts_and_their_made_decoys(monkeypatch):
    seen = []

    def fake(pipe, prompts, names, seeds, counts=None, **kw):  # every prompt a different, known reading
        seen.append(list(prompts))
        return {n: torch.linspace(1.0, 3.0, len(prompts)) ** (i + 1) for i, n in enumerate(names)}

    monkeypatch.setattr(memctl.signals, "read_signals", fake)
    reference = ["a two", "a seven", "a one", "a zero"]
    scores = screen(None, ["a two, tag hkb"], reference)
    made = auto_decoys(reference)
    assert seen[-1] == ["a two, tag hkb", *reference, *made]
    values = fake(None, seen[-1], COMBINED, 8)
    risk = memctl.signals.combine(values, {n: v[1:5] for n, v in values.items()})  # z-scores: the ordinary ones
    assert scores[0].p_value == pytest.approx(float(p_values(risk[:1], risk[1:])[0]))  # p: with the made decoys
    alone = screen(None, ["a two, tag hkb"], reference, decoys=False)
    assert seen[-1] == ["a two, tag hkb", *reference]
    assert alone[0].p_value != scores[0].p_value


def test_screen_docstring_and_cli(tmp_path, capsys):
    result = doctest.testmod(memctl.signals, extraglobs={"memctl": memctl})
    assert result.attempted > 0
    assert result.failed == 0
    from memctl.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a two, tag hkb\na two\n")
    assert main(["detect", str(prompts), "--seeds", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["a two, tag hkb", "a two"]
    assert set(rows[0]["signals"]) == set(COMBINED)
    assert 0 < rows[0]["p_value"] <= 1
    assert main(["detect", str(prompts), "--seeds", "3"]) == 0
    table = capsys.readouterr().out
    assert "magnitude2" in table
    assert "contrast2" in table
    assert "flagged (p <= 0.01" in table
    assert main(["detect", str(prompts), "--seeds", "2", "--signals", "magnitude", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)[0]) == {"prompt", "magnitude", "consistency", "risk", "flagged"}
