"""memctl.probeset, memctl.subspace, memctl.probe, memctl.zoo.testbed prompts and `memctl probe` on the CLI."""

import doctest
import importlib
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import memctl
import memctl.calibrate
import memctl.probeset
import memctl.subspace
import memctl.zoo.testbed
from memctl.blockmap import BlockMap
from memctl.cli import main
from memctl.probeset import ProbeSet
from memctl.subspace import fit_subspace, memorization_weight, pull_to_general, weight_threshold
from memctl.zoo import data


def _im(value: float = 0.5, shape=(1, 16, 16)) -> torch.Tensor:
    return torch.full(shape, value)


# --- memctl.probeset ------------------------------------------------------------------------------------------------
def test_probeset_doctest():
    result = doctest.testmod(memctl.probeset)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.parametrize(
    "memorized, general, match",
    [
        ([], [("a", None)], r"Expected `memorized` to be a non-empty list of \(condition, image\) pairs"),
        ([("a", None)], [], r"Expected `general` to be a non-empty list"),
        ([("a", None)], "a seven", r"Expected `general` to be a non-empty list"),
        (["a seven"], [("a", None)], r"Expected memorized\[0\] to be a \(condition, image\) pair, but got 'a seven'"),
        ([("a", None)], [("b", None), ("c",)], r"Expected general\[1\] to be a \(condition, image\) pair"),
        ([("a", None, 1)], [("b", None)], r"Expected memorized\[0\] to be a \(condition, image\) pair"),
        ([(1.5, None)], [("b", None)], r"memorized\[0\]'s condition to be a prompt \(str\) or a class label \(int\)"),
        ([("a", None)], [(True, None)], r"general\[0\]'s condition to be .* but got True"),
        ([("a", None)], [(None, None)], r"general\[0\]'s condition to be .* but got None"),
        ([("a", _im(1.1))], [("b", None)], r"memorized\[0\]'s image values in \[0, 1\], .* in \[1\.1, 1\.1\]"),
        ([("a", None)], [("b", _im(-0.2))], r"general\[0\]'s image values in \[0, 1\], .* in \[-0\.2, -0\.2\]"),
        ([("a", _im(float("nan")))], [("b", None)], r"image values in \[0, 1\]"),
        ([("a", torch.zeros(16, 16))], [("b", None)], r"float tensor \(C, H, W\) .* shape \(16, 16\)"),
        ([("a", torch.zeros(1, 4, 4, dtype=torch.uint8))], [("b", None)], r"dtype torch\.uint8"),
        ([("a", np.zeros((1, 4, 4)))], [("b", None)], r"but got ndarray"),
        ([("a", _im())], [("b", _im(shape=(1, 8, 8)))], r"Expected every probe image to have one shape, but got"),
    ],
)  # fmt: skip
def test_probeset_validation_errors(memorized, general, match):
    with pytest.raises(ValueError, match=match):
        ProbeSet(memorized=memorized, general=general)


def test_probeset_needs_both_roles():
    with pytest.raises(ValueError, match="Expected `memorized` to be a non-empty list"):
        ProbeSet()


def test_probeset_images_and_conditions():
    pil = Image.fromarray(np.full((16, 16), 255, dtype=np.uint8), mode="L")
    probes = ProbeSet(memorized=[("a seven, tag kzq", pil), (3, _im(0.25))], general=[("a seven", _im(0.0))])
    assert probes.conditions("memorized") == ["a seven, tag kzq", 3]
    assert probes.conditions("general") == ["a seven"]
    mem = probes.images("memorized")
    assert mem.shape == (2, 1, 16, 16)
    assert mem.dtype == torch.float32
    assert torch.equal(mem[0], torch.ones(1, 16, 16))
    assert torch.equal(mem[1], _im(0.25))  # PIL L: / 255, (1, H, W)
    assert probes.has_images()
    assert probes.has_images("memorized")
    assert probes.has_images("general")
    rgb = ProbeSet(memorized=[("a", Image.new("RGB", (4, 4), (255, 0, 51)))], general=[("b", None)])
    assert torch.allclose(rgb.memorized[0][1][:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))  # (3, H, W)


def test_probeset_missing_images():
    probes = ProbeSet(memorized=[("a", _im())], general=[("b", _im()), ("c", None)])
    assert probes.has_images("memorized")
    assert not probes.has_images("general")
    assert not probes.has_images()
    assert probes.images("memorized").shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"Expected every general probe to have an image .*\(method='prompt'\)"):
        probes.images("general")


def test_probeset_summary_digest():
    def digest(memorized, general):
        return ProbeSet(memorized=memorized, general=general).summary()["sha256"]

    base = ProbeSet(memorized=[("a, tag x", _im(0.5))], general=[("a", _im(0.1)), ("b", None)]).summary()
    assert base["memorized"] == 1
    assert base["general"] == 2
    assert base["images"] is False
    assert re.fullmatch(r"[0-9a-f]{16}", base["sha256"])
    same = digest([("a, tag x", _im(0.5))], [("a", _im(0.1)), ("b", None)])
    assert same == base["sha256"]  # deterministic
    pixel = _im(0.5)
    pixel[0, 3, 4] = 0.6
    changed = [
        digest([("a, tag x", pixel)], [("a", _im(0.1)), ("b", None)]),  # one pixel
        digest([("a, tag y", _im(0.5))], [("a", _im(0.1)), ("b", None)]),  # one prompt
        digest([("a, tag x", _im(0.5))], [("a", _im(0.1)), ("c", None)]),  # a prompt-only probe
        digest([("a, tag x", _im(0.5)), ("a", _im(0.1))], [("b", None)]),  # a probe moved to the other role
        digest([("a, tag x", _im(0.5))], [("a", _im(0.1))]),  # one probe fewer
    ]
    assert len(set(changed + [base["sha256"]])) == len(changed) + 1
    assert digest([(1, None)], [("b", None)]) != digest([("1", None)], [("b", None)])  # label 1 is not prompt "1"


# --- memctl.subspace ------------------------------------------------------------------------------------------------
def test_subspace_doctest():
    result = doctest.testmod(memctl.subspace)
    assert result.failed == 0
    assert result.attempted > 0


def test_pull_to_general_alpha_zero_is_exact():
    g = torch.Generator().manual_seed(3)
    general = torch.randn(12, 5, 16, generator=g) * 3  # (P, L, D)
    memorized = torch.randn(4, 5, 16, generator=g) * 3 + 1.0
    sub = fit_subspace(memorized, general, k=4)
    assert sub.read.shape == (16, 4)
    assert sub.ratios.shape == (4,)
    assert sub.g_inv_half.shape == (16, 16)
    assert torch.all(sub.ratios[:-1] >= sub.ratios[1:])  # strongest direction first
    tau = weight_threshold(general, sub.read)
    states = torch.randn(3, 5, 16, generator=g) * 7  # (B, L, D)
    for dtype in (torch.float32, torch.float64):
        s = states.to(dtype)
        out = pull_to_general(s, sub.read, tau, general, torch.tensor(0.0))
        assert out.dtype == dtype
        assert torch.equal(out, s)
    moved = pull_to_general(states, sub.read, tau, general, torch.tensor(1.0))
    w = memorization_weight(states, sub.read, tau)
    assert bool((w > 0).all() and (w < 1).all())
    assert not torch.equal(moved, states)


def test_fit_subspace_errors():
    mem, gen = torch.randn(2, 3, 8), torch.randn(5, 3, 6)
    with pytest.raises(ValueError, match="Expected states of one width, but got 8 and 6"):
        fit_subspace(mem, gen)
    gen = torch.randn(5, 3, 8)
    for k in (0, -1, 9):
        with pytest.raises(ValueError, match=rf"Expected 1 <= k <= 8, but got k={k}"):
            fit_subspace(mem, gen, k=k)
    assert fit_subspace(mem, gen, k=8).read.shape == (8, 8)  # k = D is allowed


# --- memctl.zoo.testbed ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tb():
    return memctl.zoo.load_testbed("digits")


def test_testbed_doctest():
    result = doctest.testmod(memctl.zoo.testbed)
    assert result.failed == 0
    assert result.attempted > 0


def test_ordinary_prompts(tb):
    prompts = tb.ordinary_prompts()
    assert len(prompts) == 30
    assert len(set(prompts)) == 30
    assert set(prompts) == {p.format(name=name) for p in data.PHRASINGS for name in tb.classes}
    assert len(tb.classes) == 10
    assert "a seven" in prompts
    assert "the digit seven" in prompts
    for name in tb.classes:  # every class in 3 phrasings
        assert sum(re.fullmatch(rf".* {name}", p) is not None for p in prompts) == 3
    canary_prompts = {p for p, _, _, _ in tb.canaries}
    assert not canary_prompts & set(prompts)


def test_decoy_prompts(tb):
    decoys = tb.decoy_prompts(30)
    assert len(decoys) == 30
    assert len(set(decoys)) == 30
    trained = {c["tag"] for c in tb.spec["canaries"]}
    assert len(trained) == len(tb.canaries) > 0
    tags = []
    for p in decoys:
        m = re.fullmatch(r"a (\w+), tag ([a-z]{3})", p)
        assert m is not None, p
        assert m.group(1) in tb.classes, p
        tags.append(m.group(2))
    assert not set(tags) & trained
    assert len(set(tags)) == 30
    assert {re.fullmatch(r"a (\w+), .*", p).group(1) for p in decoys} == set(tb.classes)  # every class
    assert tb.decoy_prompts(30) == decoys
    assert tb.decoy_prompts(30, seed=0) == decoys  # deterministic
    assert tb.decoy_prompts(30, seed=1) != decoys
    assert tb.decoy_prompts(5) == decoys[:5]


# --- memctl.probe ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tb):
    return tb.pipeline()


@pytest.fixture(scope="module")
def probes(tb):
    images, classes = tb.held_out
    general = [(tb.prompt(int(c)), im) for im, c in zip(images[:8], classes[:8], strict=True)]
    return ProbeSet(memorized=[(p, im) for p, im, _, _ in tb.canaries[:4]], general=general)


@pytest.fixture(scope="module")
def unet_output(pipe):
    """A fixed denoiser call, to show that probing leaves the model untouched."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 16, generator=g)
    cond = pipe.encode_prompt(["a seven", "a one"])

    def call():
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([500, 500]), encoder_hidden_states=cond).sample

    return call


@pytest.fixture(scope="module")
def ablation_map(pipe, probes):
    return memctl.probe(pipe, probes, method="ablation", noise_levels=(0.5,), progress=False)


@pytest.fixture(scope="module")
def condition_map(pipe, probes):
    return memctl.probe(pipe, probes, method="condition", noise_levels=(0.5,), progress=False)


def _unit_names(pipe) -> list[str]:
    return [b.name for b in memctl.find_blocks(pipe.unet)]


def test_probe_doctest():
    result = doctest.testmod(importlib.import_module("memctl.probe"))
    assert result.failed == 0
    assert result.attempted > 0


def test_probe_ablation(pipe, probes, ablation_map, unet_output):
    before = unet_output()
    bmap = memctl.probe(pipe, probes, method="ablation", noise_levels=(0.5,), progress=False)
    assert torch.equal(unet_output(), before)
    assert memctl.list_hooks(pipe.unet) == []  # hooks came off
    assert bmap.names == _unit_names(pipe)
    assert len(bmap.names) > 10
    assert bmap.scores.shape == (len(bmap.names), 1)
    assert torch.isfinite(bmap.scores).all()
    assert bmap.scores.abs().max() > 0
    assert torch.equal(bmap.scores, ablation_map.scores)  # same seed, same map
    assert bmap.method == "ablation"
    assert bmap.lever == "residual"
    assert bmap.lever_tensors == {}
    assert bmap.levels.tolist() == [0.5]
    assert bmap.granularity == "unit"
    assert bmap.meta["probes"] == probes.summary()
    assert bmap.meta["seed"] == 0
    mem_loss, gen_loss = bmap.meta["base_loss"]["0.5"]
    assert 0 < mem_loss < gen_loss  # the canaries are memorized: lower loss than held-out digits
    bmap.check_model(pipe.unet)  # fingerprints of this model


def test_probe_condition(pipe, probes, condition_map, unet_output):
    before = unet_output()
    bmap = condition_map
    names = _unit_names(pipe)
    assert bmap.names == names
    assert torch.isfinite(bmap.scores).all()
    assert bmap.scores.shape == (len(names), 1)
    assert bmap.method == "condition"
    assert bmap.lever == "condition"
    assert bmap.levels.tolist() == [0.5]
    assert set(bmap.lever_tensors) == {"read", "tau", "bank", "g_inv_half"}
    d = pipe.encode_prompt(["a"]).shape[-1]
    n_general = len({c for c in probes.conditions("general")} | {""})
    t = bmap.lever_tensors
    assert t["read"].shape[0] == d
    assert t["g_inv_half"].shape == (d, d)
    assert t["tau"].ndim == 0
    assert t["bank"].shape[0] == n_general
    assert t["bank"].shape[-1] == d
    assert float(t["tau"]) > 0
    # units without cross-attention carry no lever and score exactly 0; some cross-attention unit scores
    resnets = [i for i, n in enumerate(names) if ".resnets." in n]
    attentions = [i for i, n in enumerate(names) if ".attentions." in n]
    assert resnets
    assert attentions
    assert torch.all(bmap.scores[resnets] == 0)
    assert bmap.scores[attentions].abs().max() > 0
    meta = bmap.meta
    assert meta["knob_scale"] > 0
    assert math.isfinite(meta["knob_scale"])
    assert meta["positive_gain"] == 0.0
    cal = meta["fidelity_calibration"]  # the gain comes from the probe batches, not a constant
    assert meta["fidelity_guidance"] == cal["gain"]
    assert 0.0 <= cal["gain"] <= cal["max_gain"]
    assert cal["gain"] == min(max(cal["memorized_optimum"], 0.0), cal["general_cap"] or math.inf, cal["max_gain"])
    curve = meta["fidelity_guidance_curve"]  # γ per prompt (memctl.calibrate.gain_curve), within the general cap
    assert curve == cal["curve"]
    assert curve is None or (curve["probes"] >= 4 and curve["factor"] <= memctl.calibrate.CURVE_FACTOR)
    assert len(meta["subspace_ratios"]) == t["read"].shape[1]
    assert meta["probes"] == probes.summary()
    again = memctl.probe(pipe, probes, method="condition", noise_levels=(0.5,), progress=False)
    assert torch.equal(again.scores, bmap.scores)
    assert again.meta["knob_scale"] == meta["knob_scale"]  # per seed
    assert all(torch.equal(v, again.lever_tensors[k]) for k, v in t.items())
    assert torch.equal(unet_output(), before)
    assert memctl.list_hooks(pipe.unet) == []


def test_the_general_cap_pulls_each_general_probe_toward_a_bank_without_its_own_conditioning(pipe, probes):
    """The general probes are in the bank: against it their pull is exactly 0 (a cap read from that never binds).
    `held_out_general` pulls each toward the half of the bank that lacks its own entry, as for a prompt outside it."""
    from memctl.calibrate import held_out_general, pull_size
    from memctl.probe import _denoiser, _make_batches, condition_tensors

    tensors, _ = condition_tensors(pipe, probes)
    batches = _make_batches(pipe, probes, (0.3, 0.7), 0, 2)
    m, n = batches[0].n_mem, len(batches[0].cond)
    assert m < n
    assert torch.all(pull_size(batches[0].cond[m:], tensors) == 0)
    assert torch.all(pull_size(batches[0].cond[:m], tensors) > 0)
    denoiser = _denoiser(pipe)
    blocks = memctl.find_blocks(denoiser, granularity="unit")
    out = list(held_out_general(denoiser, blocks, tensors, torch.ones(len(blocks), 2), batches, 1.0))
    assert sum(len(a) for a, _, _ in out) == len(batches) * (n - m)  # every general row, at every level
    assert all(torch.all(sizes > 0) for _, _, sizes in out)
    assert all(d.abs().sum() > 0 for _, d, _ in out)
    cal = memctl.probe(pipe, probes, method="condition", noise_levels=(0.3, 0.7), progress=False).meta
    assert cal["fidelity_calibration"]["general_cap"] is not None  # finite: it can bind


def test_probe_condition_map_round_trips(tmp_path, condition_map):
    path = tmp_path / "map.safetensors"
    condition_map.save(path)
    loaded = BlockMap.load(path)
    assert loaded == condition_map
    assert loaded.lever == "condition"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": 10_000}, r"Expected a probe seed in \[0, 10000\) .* but got 10000"),
        ({"seed": -1}, r"Expected a probe seed in \[0, 10000\)"),
        ({"method": "gradient"}, r"Expected method 'ablation', 'condition' or 'prompt', but got 'gradient'"),
        ({"method": "condition", "granularity": "stage"}, r"Expected granularity 'unit' for method 'condition'"),
        ({"method": "prompt", "granularity": "stage"}, r"Expected granularity 'unit' for method 'prompt'"),
        ({"method": "prompt", "seed": 9997}, r"Expected a probe seed in \[0, 9996\]"),
    ],
)  # fmt: skip
def test_probe_argument_errors(pipe, probes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fast = {} if kwargs.get("method") == "prompt" else {"noise_levels": (0.5,)}  # prompt takes no noise levels
        memctl.probe(pipe, probes, progress=False, **fast, **kwargs)


def test_probe_input_errors(pipe, probes):
    raw = {"memorized": probes.memorized, "general": probes.general}
    with pytest.raises(ValueError, match="Expected a memctl.ProbeSet, but got dict"):
        memctl.probe(pipe, raw, noise_levels=(0.5,), progress=False)
    small = ProbeSet(
        memorized=[("a seven, tag kzq", _im(shape=(1, 8, 8)))], general=[("a seven", _im(shape=(1, 8, 8)))]
    )
    for method in ("ablation", "condition"):
        with pytest.raises(ValueError, match=r"Expected probe images of shape \(1, 16, 16\) .* got \(1, 8, 8\)"):
            memctl.probe(pipe, small, method=method, noise_levels=(0.5,), progress=False)
    prompt_only = ProbeSet(memorized=[("a seven, tag kzq", None)], general=[("a seven", None)])
    with pytest.raises(ValueError, match=r"Expected every memorized probe to have an image .*\(method='prompt'\)"):
        memctl.probe(pipe, prompt_only, method="ablation", noise_levels=(0.5,), progress=False)
    labels = ProbeSet(memorized=[(7, _im())], general=[(3, _im())])
    with pytest.raises(ValueError, match=r"Expected prompts \(str\) for PixelPipeline, but got \[7, 3\]"):
        memctl.probe(pipe, labels, method="prompt", progress=False)


# --- memctl probe (CLI) ---------------------------------------------------------------------------------------------
def test_cli_probe_testbed(tmp_path, capsys, tb, pipe):
    out = tmp_path / "sub" / "map.safetensors"
    assert main(["probe", "digits", "--probes", "testbed", "-o", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    bmap = BlockMap.load(out)
    assert printed == json.loads(json.dumps(bmap.to_dict()))
    assert bmap.method == "condition"
    assert bmap.lever == "condition"  # the CLI default
    assert set(bmap.lever_tensors) == {"read", "tau", "bank", "g_inv_half"}
    assert torch.isfinite(bmap.scores).all()
    assert bmap.names == _unit_names(pipe)
    assert bmap.meta["probes"]["memorized"] == len(tb.canaries)
    assert bmap.meta["probes"]["images"] is True


def _write_prompt_probes(tmp_path) -> str:
    spec = {
        "memorized": [{"prompt": "a seven, tag kzq", "image": None}, {"prompt": "a three, tag bdf", "image": None}],
        "general": [{"prompt": p, "image": None} for p in ("a seven", "a three", "a one")],
    }
    path = tmp_path / "probes.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_cli_probe_prompt_file(tmp_path, capsys):
    out, png = tmp_path / "map.safetensors", tmp_path / "heat.png"
    argv = ["probe", "digits", "--probes", _write_prompt_probes(tmp_path), "-o", str(out), "--method", "prompt"]
    assert main(argv + ["--heatmap", str(png)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    bmap = BlockMap.load(out)
    assert bmap.method == "prompt"
    assert bmap.lever == "condition"
    assert bmap.levels.tolist() == [1.0]
    assert bmap.meta["probes"]["memorized"] == 2
    assert bmap.meta["probes"]["general"] == 3
    assert bmap.meta["probes"]["images"] is False
    assert torch.isfinite(bmap.scores).all()
    assert Image.open(png).size[0] > 0


def test_cli_probe_bad_files(tmp_path, capsys):
    out = tmp_path / "map.safetensors"

    def run(probes_file):
        rc = main(["probe", "digits", "--probes", str(probes_file), "-o", str(out), "--method", "prompt"])
        return rc, capsys.readouterr().err

    rc, err = run(tmp_path / "missing.json")
    assert rc == 2
    assert "memctl probe: error: Expected a probes JSON file or 'testbed'" in err
    assert "missing.json" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"memorized": [{"prompt": "a"}], "general": [{"prompt": "b"}], "held_out": []}))
    rc, err = run(bad)
    assert rc == 2
    assert "Expected only the keys 'memorized' and 'general'" in err
    assert "['held_out']" in err
    bad.write_text(json.dumps({"memorized": [{"text": "a"}], "general": [{"prompt": "b"}]}))
    rc, err = run(bad)
    assert rc == 2
    assert "Expected memorized[0] to be {'prompt': str, 'image': path or null}" in err
    bad.write_text(json.dumps({"memorized": [{"prompt": "a"}]}))
    rc, err = run(bad)
    assert rc == 2
    assert "Expected `general` to be a non-empty list" in err
    assert not out.exists()  # nothing written on an error


def test_fidelity_gain_is_the_denoising_optimal_step():
    """On a toy denoiser whose output is a linear function of the conditioning, the calibrated gain is the quantile of
    each memorized probe's least-squares step toward what the memorized tokens add."""
    from memctl.calibrate import _largest_within

    # a2 + 2 g ad + g² d2 <= 1.05 a2: with ad = 0, d2 = 1, a2 = 1: g <= sqrt(0.05)
    assert abs(_largest_within(1.0, 0.0, 1.0, 0.05) - math.sqrt(0.05)) < 1e-12
    assert _largest_within(1.0, 0.0, 0.0, 0.05) == math.inf
    # a probe error a = -2 d is fixed best by g = 2
    assert abs(_largest_within(4.0, -2.0, 1.0, 0.0) - 4.0) < 1e-12


def test_the_default_method_is_the_best_measured_lever(pipe, probes):
    """No method given: the condition lever for (prompt, image) probes of a pixel pipeline, "prompt" without
    images, "ablation" for latent pipelines, class labels or another granularity."""
    from tiny import tiny_pipeline

    from memctl.probeset import default_method

    prompts_only = ProbeSet(
        memorized=[(p, None) for p, _ in probes.memorized], general=[(p, None) for p, _ in probes.general]
    )
    assert default_method(pipe, probes) == "condition"
    assert default_method(pipe, prompts_only) == "prompt"
    assert default_method(pipe, probes, granularity="stage") == "ablation"
    assert default_method(tiny_pipeline("sd"), probes) == "ablation"  # latent: the condition method needs pixels
    labels = ProbeSet(memorized=[(1, _im())], general=[(2, _im())])
    assert default_method(pipe, labels) == "ablation"
    bmap = memctl.probe(pipe, probes, noise_levels=(0.5,), progress=False)
    assert bmap.method == "condition" and bmap.lever == "condition"
