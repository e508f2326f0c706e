"""Memorization guidance with a gain per prompt: `memctl.calibrate.gain_curve` fits γ against a prompt's pull size on
the memorized probes, and with `per_prompt_gain` (off by default) `memctl.guidance` scales each row's contrast by its
prompt's γ over the map's."""

import dataclasses
import math

import pytest
import torch

from memctl.calibrate import gain_curve
from memctl.guidance import curve_gain
from memctl.knob import apply_knob, remove_knob, set_fidelity
from memctl.subspace import pull_norm, pull_parts
from tests.test_attention_guidance import GAIN, _guided_map
from tests.test_cached_guidance import _guide
from tests.test_hooks import _pristine
from tests.tiny import build, run


def _flat(gain: float) -> dict:
    """A curve that gives every prompt `gain` (slope 0)."""
    return {"intercept": gain, "slope": 0.0, "log_size_range": [0.0, 1.0], "factor": 1.0, "max_gain": 4.0}


def _sloped(lo: float, hi: float) -> dict:
    """A curve from γ 1 at log pull size `lo` down to 0.5 at `hi`."""
    slope = -0.5 / (hi - lo)
    return {"intercept": 1.0 - slope * lo, "slope": slope, "log_size_range": [lo, hi], "factor": 1.0, "max_gain": 4.0}


def test_the_curve_falls_with_pull_size_where_the_optima_do_and_is_flat_beyond_the_probes():
    sizes = torch.tensor([10.0, 12, 15, 20, 30, 40, 50, 60]).repeat(3)
    optima = 3.0 - 0.5 * sizes.log() + 0.01 * torch.arange(24.0).remainder(3)  # falls with log size
    curve = gain_curve(optima, sizes, max_gain=4.0, factor=1.0)
    assert curve["slope"] < 0 and curve["probes"] == 24
    g = curve_gain(curve, torch.tensor([1.0, 10.0, 60.0, 1e4]))
    assert torch.isclose(g[0], g[1]) and torch.isclose(g[2], g[3])  # held constant outside the probes' range
    assert curve_gain(curve, torch.tensor([1.0]))[0] == curve_gain(curve, torch.tensor([1e-3]))[0]
    assert g[1] > g[2] > 0
    assert abs(float(g[1]) - (3.0 - 0.5 * math.log(10.0))) < 0.05  # near the optima's upper quartile there
    tripled = gain_curve(optima, sizes, max_gain=4.0, factor=3.0)
    assert torch.allclose(curve_gain(tripled, torch.tensor([50.0])), 3 * curve_gain(curve, torch.tensor([50.0])))
    capped = curve_gain({**curve, "max_gain": 0.1}, torch.tensor([10.0]))
    assert float(capped) == pytest.approx(0.1)


def test_no_curve_from_too_few_or_alike_probes():
    assert gain_curve(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1.0, 2.0, 3.0])) is None
    assert gain_curve(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.full((4,), 5.0)) is None
    assert gain_curve(torch.tensor([0.1, math.nan, 0.3, 0.4]), torch.tensor([1.0, 2, 3, 4])) is None  # 3 usable


def _curved(bmap, curve: dict):
    """`bmap` with `curve` as its per-prompt γ, asked for."""
    curved = dataclasses.replace(bmap, meta={**bmap.meta, "fidelity_guidance_curve": curve})
    return curved.with_lever(per_prompt_gain=True)


def _guided(model, bmap, inputs, f=1.0, mode="guidance"):
    apply_knob(model, bmap, fidelity_mode=mode)
    set_fidelity(model, f)
    try:
        return run(model, inputs), _guide(model)
    finally:
        remove_knob(model)


@pytest.mark.parametrize("mode", ["guidance", "cached"])
def test_a_flat_curve_at_the_maps_gain_changes_nothing_and_at_twice_it_doubles_the_step(mode):
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs)
    plain = run(model, inputs)
    without, _ = _guided(model, bmap, inputs, mode=mode)
    same = _curved(bmap, _flat(GAIN))
    flat, guide = _guided(model, same, inputs, mode=mode)
    assert guide.curve is not None and torch.equal(flat, without)
    double = _curved(bmap, _flat(2 * GAIN))
    doubled, _ = _guided(model, double, inputs, mode=mode)
    assert torch.allclose(doubled - plain, 2 * (without - plain), atol=1e-5)
    assert not torch.allclose(doubled, without, atol=1e-4)
    none = _curved(bmap, _flat(0.0))
    zero, _ = _guided(model, none, inputs)
    assert torch.equal(zero, plain)  # γ 0 for every prompt: the plain output
    assert _pristine(model)


def test_each_row_gets_its_own_prompts_gain():
    """Two rows whose text states have different pull sizes: a sloped curve scales each row's step by its own γ."""
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs)
    e = inputs["encoder_hidden_states"]
    assert e.shape[0] >= 2
    t = bmap.lever_tensors
    sizes = pull_norm(e, *pull_parts(e, t["read"], t["tau"], t["bank"]))
    assert sizes[0] != sizes[1]
    lo, hi = sorted(sizes[:2].log().tolist())
    curve = _sloped(lo, hi)
    plain = run(model, inputs)
    without, _ = _guided(model, bmap, inputs)
    sloped, _ = _guided(model, _curved(bmap, curve), inputs)
    gains = curve_gain(curve, sizes)
    for i in range(2):
        expected = plain[i] + gains[i] / GAIN * (without[i] - plain[i])
        assert torch.allclose(sloped[i], expected, atol=1e-5)
    assert sorted(gains[:2].tolist()) == pytest.approx([0.5, 1.0])


def test_the_curve_is_used_only_when_asked_for():
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs)
    curved = dataclasses.replace(bmap, meta={**bmap.meta, "fidelity_guidance_curve": _flat(3 * GAIN)})
    default, guide = _guided(model, curved, inputs)
    assert guide.curve is None and torch.equal(default, _guided(model, bmap, inputs)[0])
    asked, guide = _guided(model, curved.with_lever(per_prompt_gain=True), inputs)
    assert guide.curve is not None and not torch.allclose(asked, default, atol=1e-4)
    with pytest.raises(ValueError, match="Expected per_prompt_gain to be True or False, but got 'yes'"):
        curved.with_lever(per_prompt_gain="yes")


def test_fidelity_zero_and_below_never_read_the_curve():
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs)
    curved = _curved(bmap, _flat(3.0))
    for f in (0.0, -1.0):
        assert torch.equal(_guided(model, curved, inputs, f=f)[0], _guided(model, bmap, inputs, f=f)[0])


@pytest.mark.parametrize("name", ["sd", "wan"])
def test_the_curve_compiles_once_for_every_fidelity_above_zero(name):
    from tests.test_knob import _condition_map, compiled_sweep

    model, inputs = build(name)
    bmap = _condition_map(model, inputs)
    e = inputs["encoder_hidden_states"]
    t = bmap.lever_tensors
    sizes = pull_norm(e.float(), *pull_parts(e.float(), t["read"], t["tau"], t["bank"]))
    lo, hi = float(sizes.min().log()), float(sizes.max().log()) + 1e-3
    curve = _sloped(lo, hi)
    bmap.meta.update(fidelity_guidance=GAIN, positive_gain=0.0, fidelity_guidance_curve=curve, per_prompt_gain=True)
    apply_knob(model, bmap, fidelity_mode="guidance")
    assert _guide(model).curve == curve
    compiles, eager, outs = compiled_sweep(model, inputs, (0.5, 1.0, 0.5))
    assert compiles == 1
    assert all(torch.allclose(outs[f], eager[f], atol=1e-5) for f in outs)
    assert not torch.allclose(eager[1.0], run(model, inputs), atol=1e-4)  # the knob did act


def test_the_shipped_digits_map_gives_the_once_seen_canaries_a_larger_gain():
    """The shipped digits-s0 map (bench/ship_maps.py) carries its curve: the 1×-exposed canaries, whose pull is
    smaller, get a larger γ than the 16×-exposed ones, and ordinary prompts at most the curve's largest."""
    import memctl.zoo
    from memctl.calibrate import pull_size
    from memctl.probe import _encode_conditions

    tb = memctl.zoo.load_testbed("digits-s0")
    pipe, bmap = tb.pipeline(), tb.block_map()
    curve = bmap.meta["fidelity_guidance_curve"]
    assert curve is not None and curve["slope"] < 0

    def gains(prompts):
        with torch.no_grad():
            return curve_gain(curve, pull_size(_encode_conditions(pipe, prompts), bmap.lever_tensors))

    gamma = {e: gains([c[0] for c in tb.canaries if c[2] == e]) for e in (1, 16)}
    ordinary = gains(tb.ordinary_prompts()[:20])
    assert gamma[1].mean() > 1.5 * gamma[16].mean()
    top = curve["factor"] * (curve["intercept"] + curve["slope"] * curve["log_size_range"][0])
    assert float(ordinary.max()) <= min(top, curve["max_gain"]) + 1e-5


def test_asking_for_a_per_prompt_gain_the_map_cannot_give_is_a_clear_error():
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs).with_lever(per_prompt_gain=True)  # no curve in its meta
    with pytest.raises(ValueError, match=r"Expected a map with meta\['fidelity_guidance_curve'\] for per_prompt"):
        apply_knob(model, bmap)
    assert _pristine(model)
    curved = _curved(_guided_map(model, inputs), _flat(GAIN))
    with pytest.raises(ValueError, match="in fidelity_mode 'guidance' or 'cached', but got a condition map in "):
        apply_knob(model, curved, fidelity_mode="attention")
    assert _pristine(model)


def test_each_general_probe_is_matched_to_its_own_bank_entry_despite_float_noise():
    """A general probe encoded in another batch can differ from its bank entry by float noise: still its own."""
    from memctl.calibrate import held_out_general

    calls = []

    def fake_contrasts(denoiser, blocks, tensors, scores, batches, knob_scale):
        calls.append(tensors["bank"].clone())
        for b in batches:
            yield torch.zeros(len(b.cond), 1), torch.zeros(len(b.cond), 1), 0

    import memctl.calibrate as calibrate

    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(5, 3, 4, generator=gen)  # 4 general prompts and the empty prompt last
    cond = bank[:4] + 1e-7 * torch.randn(4, 3, 4, generator=gen)
    from memctl.probe import _Batch

    b = _Batch(torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2), torch.zeros(4), cond, 0)
    tensors = {"read": torch.randn(4, 2, generator=gen), "tau": torch.tensor(1.0), "bank": bank}
    real = calibrate.contrasts
    calibrate.contrasts = fake_contrasts
    try:
        out = list(held_out_general(None, [], tensors, None, [b], 1.0))
    finally:
        calibrate.contrasts = real
    assert len(calls) == 2  # one pass per half: every probe was found in the bank
    for used, half in zip(calls, (0, 1), strict=True):
        kept = [i for i in range(5) if i % 2 != half or i == 4]
        assert torch.equal(used, bank[kept])
    assert sum(len(a) for a, _, _ in out) == 4
