"""memctl.attention_guidance: fidelity > 0 inside the cross-attention units, checked against a naive two-call
reference; exact at fidelity <= 0; no second denoiser pass; at most two compiled graphs."""

import pytest
import torch

from memctl.attention_guidance import AttentionGuidanceHook
from memctl.hooks import ConditionHook, list_hooks
from memctl.knob import apply_knob, get_knob, remove_knob, set_fidelity, temporary_knob
from tests.test_hooks import _pristine
from tests.test_knob import _condition_map
from tests.tiny import build, run, tiny_sd_pipeline

GAIN = 0.7


def _guided_map(model, inputs, mode=None):
    bmap = _condition_map(model, inputs)
    bmap.meta.update(fidelity_guidance=GAIN, positive_gain=0.0, **({"fidelity_mode": mode} if mode else {}))
    return bmap


def _reference(model, bmap, inputs, f):
    """Each hooked cross-attention's output `a(e) + γ f (a(e) - a(e'))` by calling the unit twice (no knob)."""
    from memctl.subspace import pull_to_general

    t = bmap.lever_tensors
    handles = []

    def hook(module, args, kwargs, output):
        e = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        pulled = pull_to_general(e, t["read"], t["tau"], t["bank"], torch.tensor(1.0))  # map scores 1: pull 1 at -1
        with torch.no_grad():
            other = module.processor(module, args[0], encoder_hidden_states=pulled)
        return output + GAIN * f * (output - other)

    for m in model.modules():
        if type(m).__name__ in ("Attention", "WanAttention") and m.is_cross_attention:
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        return run(model, inputs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", ["sd", "wan"])
@pytest.mark.parametrize("f", [0.5, 1.0])
def test_attention_mode_matches_the_two_call_reference(f, name):
    model, inputs = build(name)
    bmap = _guided_map(model, inputs)
    expected = _reference(model, bmap, inputs, f)
    apply_knob(model, bmap, fidelity_mode="attention")
    set_fidelity(model, f)
    got = run(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, run_plain(model, inputs), atol=1e-4)  # it does act
    remove_knob(model)
    assert _pristine(model)


@pytest.mark.parametrize("name", ["sd", "wan"])
def test_attention_mode_projects_keys_and_values_once_per_conditioning(name, monkeypatch):
    """At every step the hooked units' `to_k` / `to_v` project nothing: their outputs for `[e; e']` come from two
    projections made when the conditioning was first seen (one entry per unit after three calls), match the two-call
    reference, and are made again after the layer's weights are edited in place."""
    model, inputs = build(name)
    bmap = _guided_map(model, inputs)
    expected = _reference(model, bmap, inputs, 1.0)
    apply_knob(model, bmap, fidelity_mode="attention")
    set_fidelity(model, 1.0)
    paths = [p for p, n in list_hooks(model) if n == "memctl.knob" and p.endswith((".to_k", ".to_v"))]
    assert paths
    weights, tokens, real = {id(model.get_submodule(p).weight) for p in paths}, [], torch.nn.functional.linear

    def linear(x, weight, bias=None):
        if id(weight) in weights:
            tokens.append(x.shape[-2])
        return real(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    cached = [run(model, inputs) for _ in range(3)]
    # per layer: `W e + b` and `W Δ` once (the conditioning's tokens), then the layer itself on zero tokens per call
    assert sorted(tokens) == [0] * 3 * len(paths) + [inputs["encoder_hidden_states"].shape[1]] * 2 * len(paths)
    hooks = [model.get_submodule(p)._diffusers_hook.hooks["memctl.knob"] for p in paths]
    assert all(len(h.entries) == 1 for h in hooks)
    assert all(torch.allclose(c, expected, atol=1e-5, rtol=1e-4) for c in cached)
    with torch.no_grad():
        model.get_submodule(paths[0]).weight.mul_(1.5)  # an edit in place: its key changes, the parts are made again
    edited = run(model, inputs)
    remove_knob(model)
    assert _pristine(model)
    assert torch.allclose(edited, _reference(model, bmap, inputs, 1.0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(edited, cached[0], atol=1e-4)


def run_plain(model, inputs):
    with temporary_knob(model, 0.0):
        return run(model, inputs)


def test_exact_at_fidelity_zero_and_below():
    model, inputs = build("sd")
    plain = run(model, inputs)
    for mode in ("guidance", "attention"):
        apply_knob(model, _guided_map(model, inputs), fidelity_mode=mode)
        outs = {}
        for f in (0.0, -1.0, 1.0, 0.0, -1.0):
            set_fidelity(model, f)
            outs.setdefault(f, []).append(run(model, inputs))
        assert torch.equal(outs[0.0][0], plain) and torch.equal(outs[0.0][1], plain)
        assert torch.equal(outs[-1.0][0], outs[-1.0][1])
        if mode == "attention":
            attention = outs
        else:
            guidance = outs
        remove_knob(model)
    assert torch.equal(attention[-1.0][0], guidance[-1.0][0])  # fidelity < 0 is the same lever in both modes
    assert not torch.allclose(attention[1.0][0], guidance[1.0][0])  # fidelity > 0 is not


def test_one_denoiser_call_per_step_and_mode_from_meta():
    model, inputs = build("sd")
    apply_knob(model, _guided_map(model, inputs, mode="attention"))
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    set_fidelity(model, 1.0)
    run(model, inputs)
    handle.remove()
    assert len(calls) == 1
    hooked = [p for p, n in list_hooks(model) if n == "memctl.knob"]
    assert any(p.endswith(".to_q") for p in hooked) and any(p.endswith(".to_out.0") for p in hooked)
    assert get_knob(model) is not None
    remove_knob(model)
    assert _pristine(model)
    apply_knob(model, _guided_map(model, inputs, mode="attention"), fidelity_mode="guidance")  # the argument wins
    assert not any(p.endswith(".to_q") for p, _ in list_hooks(model))
    remove_knob(model)


def test_bad_mode_and_unsupported_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, inputs = build("sd")
    with pytest.raises(ValueError, match="fidelity_mode"):
        apply_knob(model, _guided_map(model, inputs), fidelity_mode="pass")

    class Custom(AttnProcessor2_0):
        pass

    model.set_attn_processor(Custom())
    with pytest.raises(ValueError, match="fidelity_mode='guidance'"):
        apply_knob(model, _guided_map(model, inputs), fidelity_mode="attention")
    assert _pristine(model)


def test_attention_mode_compiles_to_at_most_two_graphs():
    model, inputs = build("sd")
    apply_knob(model, _guided_map(model, inputs), fidelity_mode="attention")
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    eager = {}
    for f in (0.0, 0.5, 1.0):
        set_fidelity(model, f)
        eager[f] = run(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for f in (0.0, 0.5, 1.0, 0.5, 0.0, 1.0):
        set_fidelity(compiled, f)
        assert torch.allclose(run(compiled, inputs), eager[f], atol=1e-6)
    assert len(compiles) == 2
    remove_knob(compiled)
    torch._dynamo.reset()


def test_tiny_sd_pipeline_samples_with_attention_mode():
    pipe = tiny_sd_pipeline()
    model = pipe.unet
    bmap = _condition_map(model, {"encoder_hidden_states": torch.zeros(1, 8, model.config.cross_attention_dim)})
    bmap.meta.update(fidelity_guidance=GAIN, positive_gain=0.0, fidelity_mode="attention")

    def sample(**kw):
        return pipe("ab", num_inference_steps=2, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip

    plain = sample()
    apply_knob(pipe, bmap)
    assert isinstance(next(h for h in _hooks(model) if isinstance(h, ConditionHook)), AttentionGuidanceHook)
    set_fidelity(pipe, 0.0)
    assert torch.equal(sample(), plain)
    set_fidelity(pipe, 1.0)
    guided = sample()
    assert guided.shape == plain.shape and torch.isfinite(guided).all() and not torch.equal(guided, plain)
    remove_knob(pipe)
    assert torch.equal(sample(), plain)


def _hooks(model):
    for m in model.modules():
        registry = m.__dict__.get("_diffusers_hook")
        if registry is not None:
            yield from registry.hooks.values()


def test_docstring_examples(tmp_path):
    import doctest

    import memctl.attention_calibrate
    import memctl.attention_guidance
    from memctl.knob import apply_knob, remove_knob, set_fidelity

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    bmap = _guided_map(pipe.unet, {"encoder_hidden_states": torch.zeros(1, 8, pipe.unet.config.cross_attention_dim)})
    globs = dict(pipe=pipe, bmap=bmap, apply_knob=apply_knob, set_fidelity=set_fidelity, remove_knob=remove_knob)
    for module in (memctl.attention_guidance, memctl.attention_calibrate):
        result = doctest.testmod(module, extraglobs=globs)
        assert result.failed == 0 and result.attempted > 0
