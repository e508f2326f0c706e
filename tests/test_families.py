"""The knob on a tiny pipeline of every family: exact at 0, acting at ±1, every block mapped, conditional pass only."""

import doctest

import pytest
import torch

import memctl.passes
from memctl.blockmap import BlockMap
from memctl.blocks import find_blocks
from memctl.hooks import list_hooks
from memctl.knob import apply_knob, fidelity, get_knob, remove_knob, set_fidelity
from tests.tiny import (
    PIPELINE_FAMILIES,
    build,
    denoiser_outputs,
    denoisers,
    doc_globs,
    full_map,
    run,
    sample,
    tiny_pipeline,
)

FAMILIES = list(PIPELINE_FAMILIES)


def _clean(pipe) -> bool:
    """No memctl hook or buffer left on any denoiser (diffusers' own cache-context registry may stay)."""
    return all(
        not list_hooks(m, prefix="memctl") and not [n for n, _ in m.named_buffers() if "memctl" in n]
        for m in denoisers(pipe).values()
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_knob_on_every_pipeline(name):
    pipe = tiny_pipeline(name)
    ref = sample(pipe, name)
    bmap = full_map(pipe)
    units = {c: find_blocks(m) for c, m in denoisers(pipe).items()}
    assert bmap.n_blocks == sum(len(u) for u in units.values())  # the map covers every block
    apply_knob(pipe, bmap)
    hooked = sum(len(list_hooks(m)) for m in denoisers(pipe).values())
    assert hooked == bmap.n_blocks + len(units)  # one hook per unit, one clock per denoiser
    assert torch.equal(sample(pipe, name), ref)  # fidelity 0: bit for bit
    outs = {}
    for f in (-1.0, 1.0):
        with fidelity(pipe, f):
            outs[f] = sample(pipe, name)
        assert not torch.equal(outs[f], ref)
    assert not torch.equal(outs[-1.0], outs[1.0])
    remove_knob(pipe)
    assert torch.equal(sample(pipe, name), ref)
    assert _clean(pipe)


def _first_step(name, plain, knobbed):
    """((uncond plain, uncond knobbed), (cond plain, cond knobbed)) of the first denoising step's outputs."""
    guidance = PIPELINE_FAMILIES[name].guidance
    if guidance == "calls":  # two calls per step: "cond", then "uncond"
        return (plain[1][1], knobbed[1][1]), (plain[0][1], knobbed[0][1])
    a, b = plain[0][1], knobbed[0][1]
    h = a.shape[0] // 2
    if guidance == "labels":  # DiT: [class labels, null class]
        return (a[h:], b[h:]), (a[:h], b[:h])
    return (a[:h], b[:h]), (a[h:], b[h:])  # one batch: [uncond, cond]


@pytest.mark.parametrize("name", FAMILIES)
def test_cond_pass_only_leaves_the_unconditional_prediction_exact(name):
    pipe = tiny_pipeline(name)
    bmap = full_map(pipe)
    with denoiser_outputs(pipe) as plain:
        ref = sample(pipe, name)
    out = {}
    for passes in ("both", "cond"):
        apply_knob(pipe, bmap, passes=passes)
        assert torch.equal(sample(pipe, name), ref)
        assert get_knob(pipe).passes == passes
        with fidelity(pipe, -1.0), denoiser_outputs(pipe) as knobbed:
            out[passes] = sample(pipe, name)
        (u_plain, u_knob), (c_plain, c_knob) = _first_step(name, plain, knobbed)
        assert not torch.equal(c_plain, c_knob)
        assert torch.equal(u_plain, u_knob) == (passes == "cond")
    remove_knob(pipe)
    assert not torch.equal(out["cond"], out["both"])
    assert _clean(pipe)


@pytest.mark.parametrize("name, no_guidance", [("sd", {"guidance_scale": 1.0}), ("flux", {"true_cfg_scale": 1.0}),
                                               ("dit", {"guidance_scale": 1.0})])  # fmt: skip
def test_without_guidance_cond_only_is_both(name, no_guidance):
    pipe = tiny_pipeline(name)
    bmap = full_map(pipe)
    out = {}
    for passes in ("both", "cond"):
        apply_knob(pipe, bmap, passes=passes)
        set_fidelity(pipe, -1.0)
        out[passes] = sample(pipe, name, **no_guidance)
    remove_knob(pipe)
    assert torch.equal(out["both"], out["cond"])


@pytest.mark.parametrize("family", ["sd", "pixart", "sd3"])
def test_cond_pass_on_a_bare_denoiser_reads_the_batch(family):
    """A batch whose halves repeat the same latents is [uncond, cond]; any other batch is conditional."""
    model, inputs = build(family)
    key = "sample" if "sample" in inputs else "hidden_states"
    x = inputs[key][:1]
    guided = {**inputs, key: torch.cat([x, x])}  # (2, ...): one latent, two conditionings
    ref, ref_other = run(model, guided), run(model, inputs)
    apply_knob(model, BlockMap.from_scores(model, {b.name: 1.0 for b in find_blocks(model)}), passes="cond")
    set_fidelity(model, -1.0)
    out, other = run(model, guided), run(model, inputs)
    assert torch.equal(out[:1], ref[:1])
    assert not torch.equal(out[1:], ref[1:])
    assert not torch.equal(other[:1], ref_other[:1])
    assert not torch.equal(other[1:], ref_other[1:])
    remove_knob(model)
    assert torch.equal(run(model, guided), ref)


def test_wan22_a_map_per_expert():
    pipe = tiny_pipeline("wan22")
    high, low = pipe.transformer, pipe.transformer_2
    with denoiser_outputs(pipe) as plain:
        ref = sample(pipe, "wan22")
    assert [c for c, _ in plain][::2] == ["transformer", "transformer_2"]  # step 1 high noise, step 2 low noise
    both = full_map(pipe)
    assert set(both.components) == {"transformer", "transformer_2"}
    apply_knob(pipe, both)
    assert get_knob(pipe).components == ("transformer", "transformer_2")
    assert torch.equal(sample(pipe, "wan22"), ref)
    with fidelity(pipe, -1.0):
        changed = sample(pipe, "wan22")
    only_low = BlockMap.from_scores(low, {b.name: 1.0 for b in find_blocks(low)}, component="transformer_2")
    apply_knob(pipe, only_low)  # replaces the knob on both experts
    assert get_knob(pipe).components == ("transformer_2",)
    assert not list_hooks(high)
    with fidelity(pipe, -1.0), denoiser_outputs(pipe) as knobbed:
        low_only = sample(pipe, "wan22")
    assert all(torch.equal(a, b) for (c, a), (_, b) in zip(plain, knobbed, strict=True) if c == "transformer")
    assert not torch.equal(plain[-1][1], knobbed[-1][1])
    assert not torch.equal(low_only, ref)
    assert not torch.equal(low_only, changed)
    remove_knob(pipe)
    assert torch.equal(sample(pipe, "wan22"), ref)
    assert _clean(pipe)


def test_bad_passes_is_a_clear_error():
    model, _ = build("sd")
    bmap = BlockMap.from_scores(model, {"mid_block": 1.0})
    with pytest.raises(ValueError, match=r"Expected passes in \('both', 'cond'\), but got 'uncond'"):
        apply_knob(model, bmap, passes="uncond")
    assert not list_hooks(model)


def test_passes_docstring_example(tmp_path):
    globs = {**doc_globs(tmp_path), "apply_knob": apply_knob, "fidelity": fidelity, "remove_knob": remove_knob}
    result = doctest.testmod(memctl.passes, extraglobs=globs)
    assert result.failed == 0
    assert result.attempted > 0
