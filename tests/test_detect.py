"""Prompt-only detection (memctl.detection), the prompt-only probe, and memorization guidance (fidelity > 0)."""

import doctest

import pytest
import torch
from tiny import PIPELINE_FAMILIES, denoiser_outputs, sample, tiny_pipeline, wan22_prompt_mapped

import memctl
import memctl.detection
import memctl.guidance
from memctl.detection import detect, noise_differences, robust_z, roc_auc, signals


def test_roc_auc_and_robust_z_by_hand():
    assert roc_auc([3.0, 2.0], [1.0, 0.0]) == 1.0
    assert roc_auc([0.0], [1.0]) == 0.0
    assert roc_auc([1.0, 3.0], [1.0, 2.0]) == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_auc([], [1.0])
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # median 3, MAD 1
    assert torch.allclose(robust_z(torch.tensor([3.0, 4.4826]), ref), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("name", ["sd", "wan"])
def test_noise_differences_are_cond_minus_uncond_of_the_first_steps(name):
    """One batch (SD: uncond chunk first) and two calls (Wan: cache_context cond/uncond) give the same reading."""
    pipe = tiny_pipeline(name)
    call = {k: v for k, v in PIPELINE_FAMILIES[name].call.items() if k not in ("prompt", "guidance_scale")}
    call["num_inference_steps"] = 3
    d = noise_differences(pipe, ["ab", "ba"], seed=3, steps=2, guidance_scale=5.0, **call)
    assert d.shape[:2] == (2, 2)
    gens = [torch.Generator().manual_seed(3) for _ in range(2)]
    with denoiser_outputs(pipe) as outs:
        pipe(["ab", "ba"], generator=gens, guidance_scale=5.0, **call)
    if name == "sd":
        expected = [o.chunk(2)[1] - o.chunk(2)[0] for _, o in outs[:2]]
    else:  # Wan runs the conditional call first, then the unconditional one
        expected = [outs[2 * i][1] - outs[2 * i + 1][1] for i in range(2)]
    for step in range(2):
        assert torch.allclose(d[:, step], expected[step].float().reshape(2, -1), atol=1e-6)
    assert memctl.list_hooks(pipe.transformer if name == "wan" else pipe.unet) == []


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux", "animatediff", "cogvideox", "wan22"])
def test_detect_runs_on_every_text_conditional_family(name):
    pipe = tiny_pipeline(name)
    call = {k: v for k, v in PIPELINE_FAMILIES[name].call.items() if k not in ("prompt", "guidance_scale")}
    magnitude, consistency = signals(pipe, ["ab", "ba"], seeds=2, guidance_scale=5.0, progress=False, **call)
    assert magnitude.shape == (2,)
    assert bool((magnitude > 0).all())
    assert bool(consistency.abs().le(1 + 1e-6).all())
    assert all(memctl.list_hooks(m) == [] for m in (getattr(pipe, c, None) for c in ("unet", "transformer",
               "transformer_2")) if m is not None)  # fmt: skip


def test_detect_on_a_class_conditional_pipeline_reads_class_labels():
    pipe = tiny_pipeline("dit")
    d = noise_differences(pipe, [1, 2], seed=0, num_inference_steps=2)
    with denoiser_outputs(pipe) as outs:
        gens = [torch.Generator().manual_seed(0) for _ in range(2)]
        pipe(class_labels=[1, 2], generator=gens, num_inference_steps=2)
    out = outs[0][1][:, : pipe.transformer.config.in_channels]  # rows [labels, null class]; learned sigma dropped
    assert torch.allclose(d[:, 0], (out[:2] - out[2:]).reshape(2, -1), atol=1e-6)
    with pytest.raises(ValueError, match=r"Expected class labels \(int\) for DiTPipeline"):
        noise_differences(pipe, ["ab"], seed=0)
    with pytest.raises(ValueError, match=r"Expected prompts \(str\)"):
        noise_differences(tiny_pipeline("sd"), [1], seed=0)


def test_unmarked_two_call_guidance_pairs_calls_on_the_same_latents():
    """diffusers' FluxImg2ImgPipeline runs true CFG as two calls without cache_context: conditional, then negative."""
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    pipe = FluxImg2ImgPipeline.from_pipe(tiny_pipeline("flux"))
    pipe.set_progress_bar_config(disable=True)
    call = dict(image=[Image.new("RGB", (8, 8), (90, 30, 200))] * 2, strength=0.7, num_inference_steps=3, height=8,
                width=8, max_sequence_length=8, negative_prompt="c", true_cfg_scale=2.0)  # fmt: skip
    d = noise_differences(pipe, ["ab", "ba"], seed=3, steps=2, **call)
    gens = [torch.Generator().manual_seed(3) for _ in range(2)]
    with denoiser_outputs(pipe) as outs:
        pipe(["ab", "ba"], generator=gens, **call)
    assert len(outs) >= 4
    assert not torch.equal(outs[0][1], outs[1][1])  # two calls per step
    for step in range(2):
        expected = (outs[2 * step][1] - outs[2 * step + 1][1]).float().reshape(2, -1)
        assert torch.allclose(d[:, step], expected, atol=1e-6)
    with pytest.raises(ValueError, match="unconditional pass"):  # without true CFG: one call per step, no partner
        noise_differences(pipe, ["ab"], seed=0, **{**call, "image": call["image"][:1], "true_cfg_scale": 1.0})
    assert memctl.list_hooks(pipe.transformer) == []


def test_detect_needs_an_unconditional_pass_and_leaves_no_hooks():
    pipe = tiny_pipeline("flux")
    call = {k: v for k, v in PIPELINE_FAMILIES["flux"].call.items() if k not in ("prompt", "negative_prompt")}
    call.pop("true_cfg_scale")
    with pytest.raises(ValueError, match="unconditional pass"):
        noise_differences(pipe, ["ab"], seed=0, **call)
    assert memctl.list_hooks(pipe.transformer) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seeds": 1}, "at least 2 seeds"),
        ({"guidance_scale": 1.0}, "guidance_scale > 1"),
        ({"steps": 0}, "steps a positive int"),
        ({"prompts": "a seven"}, "list of prompt strings"),
        ({"prompts": []}, "list of prompt strings"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    pipe = tiny_pipeline("sd")
    args = {"prompts": ["ab"], **kwargs}
    with pytest.raises(ValueError, match=match):
        signals(pipe, progress=False, **args)


def test_more_steps_than_the_schedule_is_a_clear_error():
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match="ran 2"):
        noise_differences(pipe, ["ab"], seed=0, steps=3, num_inference_steps=2, height=8, width=8)


@pytest.fixture(scope="module")
def digits():
    tb = memctl.zoo.load_testbed("digits")
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return tb, pipe


def test_most_exposed_canaries_have_a_larger_signal_than_ordinary_prompts(digits):
    tb, pipe = digits
    most = [c[0] for c in tb.canaries if c[2] == max(tb.exposures)]
    scores = detect(pipe, most, reference=tb.ordinary_prompts(), seeds=2, progress=False)
    ordinary = detect(pipe, tb.ordinary_prompts(), reference=tb.ordinary_prompts(), seeds=2, progress=False)
    assert roc_auc([s.magnitude for s in scores], [s.magnitude for s in ordinary]) >= 0.9
    assert sum(s.flagged for s in ordinary) <= 1  # ordinary prompts against themselves: robust z rarely > 3
    assert all(-1 <= s.consistency <= 1 for s in scores)


def test_prompt_only_probe_maps_every_block(digits):
    tb, pipe = digits
    probes = memctl.ProbeSet(memorized=[(c[0], None) for c in tb.canaries if c[2] == 16][:4],
                             general=[(p, None) for p in tb.ordinary_prompts()[:10]])  # fmt: skip
    bmap = memctl.probe(pipe, probes, method="prompt", progress=False)
    names = [b.name for b in memctl.find_blocks(pipe.unet)]
    assert bmap.names == names
    assert bmap.method == "prompt"
    assert bmap.lever == "condition"
    attention = [i for i, n in enumerate(names) if "attentions" in n]
    assert bmap.scores[attention].abs().sum() > 0  # units with cross-attention carry the lever
    others = [i for i in range(len(names)) if i not in attention]
    assert bmap.scores[others].abs().sum() == 0
    assert bmap.meta["fidelity_guidance"] > 0
    assert bmap.meta["knob_scale"] > 0


@pytest.mark.parametrize("name", ["sd", "sdxl", "animatediff", "wan"])
def test_prompt_only_probe_uses_the_condition_lever(name):
    """UNets cross-attending to the prompt states, and Wan's `attn2` (reading them through its text projection)."""
    pipe = tiny_pipeline(name)
    call = {k: v for k, v in PIPELINE_FAMILIES[name].call.items() if k not in ("prompt", "guidance_scale")}
    probes = memctl.ProbeSet(memorized=[("ab", None)], general=[("ba", None), ("aa", None)])
    bmap = memctl.probe(pipe, probes, method="prompt", progress=False, call_kwargs=call)
    denoiser = pipe.transformer if name == "wan" else pipe.unet
    assert bmap.names == [b.name for b in memctl.find_blocks(denoiser)]
    assert bmap.lever == "condition"
    assert bmap.scores.abs().sum() > 0
    ref = sample(pipe, name)
    memctl.apply_knob(pipe, bmap)
    assert torch.equal(sample(pipe, name), ref)
    with memctl.fidelity(pipe, -1.0):
        assert not torch.equal(sample(pipe, name), ref)
    with memctl.fidelity(pipe, 1.0):  # memorization guidance: one extra pass
        assert not torch.equal(sample(pipe, name), ref)
    memctl.remove_knob(pipe)


@pytest.mark.parametrize("name", ["sd3", "flux", "dit", "cogvideox", "wan22"])
def test_prompt_only_probe_picks_the_lever_each_family_has(name):
    """Joint attention (SD3, Flux, CogVideoX): the condition lever on each block's text stream (memctl.joint). Two
    experts, each with its own text projection (Wan 2.2): the condition lever with each expert's own tensors
    (memctl.experts). No text to pull (class labels): the residual lever, each unit ablated on the signal."""
    pipe = tiny_pipeline(name)
    call = {k: v for k, v in PIPELINE_FAMILIES[name].call.items()
            if k not in ("prompt", "guidance_scale", "class_labels", "output_type")}  # fmt: skip
    conds = ([1], [2, 3]) if name == "dit" else (["ab"], ["ba", "aa"])
    probes = memctl.ProbeSet(memorized=[(c, None) for c in conds[0]], general=[(c, None) for c in conds[1]])
    bmap = memctl.probe(pipe, probes, method="prompt", progress=False, call_kwargs=call)
    found = {c: m for c, m in ((c, getattr(pipe, c, None)) for c in ("unet", "transformer", "transformer_2")) if m}
    assert bmap.lever == ("residual" if name == "dit" else "condition")
    assert sorted(bmap.fingerprints) == sorted(found)
    assert len(bmap.names) == sum(len(memctl.find_blocks(m)) for m in found.values())
    assert bool(torch.isfinite(bmap.scores).all())
    assert bmap.scores.abs().sum() > 0
    ref = sample(pipe, name)
    memctl.apply_knob(pipe, bmap)
    assert torch.equal(sample(pipe, name), ref)
    with memctl.fidelity(pipe, -1.0):
        assert not torch.equal(sample(pipe, name), ref)
    memctl.remove_knob(pipe)


def test_call_kwargs_only_with_the_prompt_method():
    probes = memctl.ProbeSet(memorized=[("ab", None)], general=[("ba", None), ("aa", None)])
    with pytest.raises(ValueError, match="call_kwargs only with method 'prompt'"):
        memctl.probe(tiny_pipeline("sd"), probes, method="condition", call_kwargs={"height": 8})


def test_noise_levels_are_not_silently_ignored_by_the_prompt_method():
    probes = memctl.ProbeSet(memorized=[("ab", None)], general=[("ba", None), ("aa", None)])
    with pytest.raises(ValueError, match=r"Expected no noise_levels with method 'prompt'.*\(0\.5,\)"):
        memctl.probe(tiny_pipeline("sd"), probes, method="prompt", noise_levels=(0.5,), progress=False)


# --- memorization guidance: the fidelity > 0 side of the condition lever ------------------------------------------


@pytest.fixture(scope="module")
def condition_map(digits):
    tb, pipe = digits
    bmap = tb.block_map()
    bmap.meta.update(positive_gain=0.0, fidelity_guidance=0.5, pull_max=1.0)  # f = -1: exactly the guidance's pull
    return bmap


def _eps(pipe, prompt, seed=0):
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    cond = pipe.encode_prompt([prompt])
    return pipe.unet(x, torch.tensor([700]), encoder_hidden_states=cond).sample


def test_guidance_is_out_plus_gain_times_out_minus_pulled(digits, condition_map):
    tb, pipe = digits
    canary = tb.canaries[0][0]
    memctl.apply_knob(pipe, condition_map)
    try:
        plain = _eps(pipe, canary)
        with memctl.fidelity(pipe, -1.0):
            pulled = _eps(pipe, canary)
        with memctl.fidelity(pipe, 0.6):
            guided = _eps(pipe, canary)
            ordinary = _eps(pipe, "a seven")
        assert not torch.equal(guided, plain)
        assert torch.allclose(guided, plain + 0.5 * 0.6 * (plain - pulled), atol=1e-5)
        assert torch.equal(ordinary, _eps(pipe, "a seven"))  # no memorized tokens: left as it was, bit for bit
    finally:
        memctl.remove_knob(pipe)
    assert memctl.list_hooks(pipe.unet) == []
    assert "_memctl_knob_guide" not in dict(pipe.unet.named_buffers())


def test_pull_past_the_general_conditioning_at_negative_fidelity_only(digits, condition_map):
    """pull_max 2: fidelity -1 moves memorized tokens up to twice the way to the general ones; the guidance at
    fidelity > 0 still contrasts with the prompt made general (no overshoot), and ordinary prompts stay exact."""
    tb, pipe = digits
    canary = tb.canaries[0][0]
    far = memctl.BlockMap.load(tb.path / "blockmap.safetensors")
    far.meta.update(condition_map.meta, pull_max=2.0)
    out = {}
    for name, bmap in (("near", condition_map), ("far", far)):
        memctl.apply_knob(pipe, bmap)
        for f in (-1.0, -0.3, 0.6):
            with memctl.fidelity(pipe, f):
                out[name, f] = _eps(pipe, canary)
                out[name, f, "ordinary"] = _eps(pipe, "a seven")
        memctl.remove_knob(pipe)
    assert not torch.equal(out["near", -1.0], out["far", -1.0])
    assert torch.equal(out["near", 0.6], out["far", 0.6])
    plain = _eps(pipe, "a seven")
    assert all(torch.equal(out[name, f, "ordinary"], plain) for name in ("near", "far") for f in (-1.0, -0.3, 0.6))
    factors = memctl.knob_law(torch.tensor([2.0, 1.0, 0.5]), -1.0, scale=1.0, floor=-1.0)
    assert torch.equal(factors, torch.tensor([-1.0, 0.0, 0.5]))


@pytest.mark.parametrize(("mode", "passes"), [("guidance", 6), (None, 4)])  # the default, "cached": step 1 only
def test_the_extra_pass_runs_only_above_fidelity_zero(digits, condition_map, mode, passes):
    tb, pipe = digits
    calls = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda *a: calls.append(1))
    memctl.apply_knob(pipe, condition_map, fidelity_mode=mode)
    try:
        counts = {}
        for f in (-1.0, 0.0, 0.5):
            calls.clear()
            with memctl.fidelity(pipe, f):
                pipe(tb.canaries[0][0], num_inference_steps=3, output_type="pt")
            counts[f] = len(calls)
        assert counts == {-1.0: 3, 0.0: 3, 0.5: passes}
    finally:
        handle.remove()
        memctl.remove_knob(pipe)


def test_compiled_denoiser_makes_at_most_two_graphs_across_fidelity(digits, condition_map):
    from torch._dynamo.utils import counters

    tb, pipe = digits
    memctl.apply_knob(pipe, condition_map)
    canary = tb.canaries[0][0]
    fidelities = (0.0, -0.5, 0.5, 1.0, -1.0)  # the last one is new after both sides have compiled
    eager = {}
    for f in fidelities:
        with memctl.fidelity(pipe, f):
            eager[f] = _eps(pipe, canary)
    torch._dynamo.reset()
    counters.clear()
    unet = pipe.unet
    pipe.unet = torch.compile(unet, backend="eager", fullgraph=True)
    try:
        for f in fidelities:
            with memctl.fidelity(pipe, f):
                out = _eps(pipe, canary)
            assert torch.allclose(out, eager[f], atol=1e-6), f
        assert counters["stats"]["unique_graphs"] <= 2
    finally:
        pipe.unet = unet
        memctl.remove_knob(pipe)
        torch._dynamo.reset()


def test_cli_detect(tmp_path, capsys):
    from memctl.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# canaries and ordinary prompts\na seven\n\na handwritten two\n")
    assert main(["detect", str(prompts), "--seeds", "2", "--signals", "magnitude", "--json"]) == 0
    rows = __import__("json").loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["a seven", "a handwritten two"]
    assert set(rows[0]) == {"prompt", "magnitude", "consistency", "risk", "flagged"}
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert main(["detect", str(empty)]) == 2
    assert "at least one prompt" in capsys.readouterr().err
    assert main(["detect", str(prompts), "--guidance", "1.0"]) == 2
    assert "guidance_scale > 1" in capsys.readouterr().err


def test_module_docstring_examples(digits):
    result = doctest.testmod(memctl.detection, extraglobs={"memctl": memctl})
    assert result.failed == 0
    assert result.attempted > 0
    tb, pipe = digits
    globs = {"pipe": pipe, "bmap": tb.block_map(), "apply_knob": memctl.apply_knob,
             "set_fidelity": memctl.set_fidelity, "remove_knob": memctl.remove_knob}  # fmt: skip
    result = doctest.testmod(memctl.guidance, extraglobs=globs)
    assert result.failed == 0
    assert result.attempted == 3
    assert memctl.list_hooks(pipe.unet) == []


def test_wan22_experts_get_their_own_condition_tensors(tmp_path):
    """Each Wan 2.2 expert's subspace, threshold and bank are fitted on what its own attn2 reads (its own text
    projection), stored under `<name>/transformer_2`, handed to each expert by `select`, kept by save/load; a map
    missing one of them is refused."""
    from memctl.probe import text_states

    pipe, bmap = wan22_prompt_mapped()
    assert bmap.lever == "condition"
    high, low = bmap.select("transformer").lever_tensors, bmap.select("transformer_2").lever_tensors
    assert set(high) == set(low) == {"read", "tau", "bank", "g_inv_half"}
    assert not torch.equal(high["bank"], low["bank"])
    states = text_states(pipe, ["ba"], component="transformer_2")
    length = low["bank"].shape[1]  # the bank keeps the prompts' tokens and one of the padding tail
    assert torch.allclose(low["bank"][0], states[0, :length], atol=1e-5)  # "ba" as transformer_2's attn2 reads it
    bmap.save(tmp_path / "m.safetensors")
    again = memctl.BlockMap.load(tmp_path / "m.safetensors")
    assert all(torch.equal(v, again.lever_tensors[k]) for k, v in bmap.lever_tensors.items())
    control = bmap.shuffled(seed=1)  # the random-subspace control replaces each expert's subspace, in its own space
    for own in ("", "/transformer_2"):
        assert not torch.equal(control.lever_tensors["read" + own], bmap.lever_tensors["read" + own])
        assert torch.equal(control.lever_tensors["bank" + own], bmap.lever_tensors["bank" + own])
    broken = {k: v for k, v in bmap.lever_tensors.items() if k != "tau/transformer_2"}
    with pytest.raises(ValueError, match="together"):
        memctl.BlockMap(bmap.names, bmap.scores, bmap.levels, bmap.kinds, bmap.components, bmap.fingerprints,
                        bmap.granularity, bmap.method, bmap.meta, bmap.samples, "condition", broken)  # fmt: skip
