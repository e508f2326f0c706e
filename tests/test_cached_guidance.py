"""fidelity_mode="cached": memorization guidance whose contrast is computed on every 10th step of a call and reused
between; checked against the "guidance" mode step by step, per conditioning, inside the knob's window."""

import pytest
import torch

from memctl.guidance import GUIDANCE_EVERY, GuidanceHook
from memctl.knob import apply_knob, get_knob, remove_knob, set_fidelity
from tests.test_attention_guidance import _guided_map
from tests.test_hooks import _pristine
from tests.tiny import build, run

F = 1.0


def _steps(inputs, n, seed=0):
    """`n` denoiser calls of one sampling loop: new latents and a lower timestep each, the same text states."""
    gen = torch.Generator().manual_seed(seed)
    x, e = inputs["sample"], inputs["encoder_hidden_states"]
    return [{**inputs, "sample": torch.randn(x.shape, generator=gen), "encoder_hidden_states": e,
             "timestep": torch.tensor(900 - 60 * i)} for i in range(n)]  # fmt: skip


def _outputs(model, bmap, calls, mode, f=F, **kw):
    apply_knob(model, bmap, fidelity_mode=mode, **kw)
    set_fidelity(model, f)
    try:
        return [run(model, c) for c in calls], _guide(model)
    finally:
        remove_knob(model)


def _guide(model) -> GuidanceHook:
    return model.__dict__["_memctl_knob"].guide


def test_cached_contrast_is_computed_every_tenth_step_and_reused_between():
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs)
    calls = _steps(inputs, 12)
    guided, _ = _outputs(model, bmap, calls, "guidance")
    cached, guide = _outputs(model, bmap, calls, "cached")
    plain = [run(model, c) for c in calls]
    assert guide.extra_passes == 2 and guide.extra_rows == 2 * calls[0]["sample"].shape[0]
    for i in (0, GUIDANCE_EVERY):  # computed: exactly the guidance mode
        assert torch.equal(cached[i], guided[i])
    for i in (1, 5, GUIDANCE_EVERY - 1, GUIDANCE_EVERY + 1):  # between: the plain output plus step 0's (10's) contrast
        source = 0 if i < GUIDANCE_EVERY else GUIDANCE_EVERY
        expected = plain[i] + (guided[source] - plain[source])
        assert torch.allclose(cached[i], expected, atol=1e-5)
        assert not torch.allclose(cached[i], plain[i], atol=1e-4)  # it does act between
    assert _pristine(model)


def test_a_new_conditioning_gets_its_own_contrast():
    """A new call (new text states) never takes the last call's contrast, even with the same latent shape."""
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs)
    first = _steps(inputs, 3)
    other = {**first[1], "encoder_hidden_states": inputs["encoder_hidden_states"].flip(0).clone()}
    guided, _ = _outputs(model, bmap, [other], "guidance")
    cached, guide = _outputs(model, bmap, [*first, other], "cached")
    assert torch.equal(cached[-1], guided[0]) and guide.extra_passes == 2


def test_states_edited_in_place_are_a_new_conditioning():
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs)
    calls = _steps(inputs, 2)
    apply_knob(model, bmap, fidelity_mode="cached")
    set_fidelity(model, F)
    run(model, calls[0])
    calls[1]["encoder_hidden_states"].mul_(1.5)  # same tensor, new values
    run(model, calls[1])
    assert _guide(model).extra_passes == 2
    remove_knob(model)


def test_cached_mode_is_exact_at_fidelity_zero_and_below_and_acts_only_inside_the_window():
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs)
    calls = _steps(inputs, 4)
    plain = [run(model, c) for c in calls]
    zero, guide = _outputs(model, bmap, calls, "cached", f=0.0)
    assert all(torch.equal(a, b) for a, b in zip(zero, plain, strict=True)) and guide.extra_passes == 0
    below, _ = _outputs(model, bmap, calls, "cached", f=-1.0)
    reference, _ = _outputs(model, bmap, calls, "guidance", f=-1.0)
    assert all(torch.equal(a, b) for a, b in zip(below, reference, strict=True))
    # window [0.75, 1]: steps at t = 0.9, 0.84, 0.78 inside, 0.72 outside; step 0's contrast must not leak into it
    windowed, _ = _outputs(model, bmap, calls, "cached", start=0.75)
    assert not torch.allclose(windowed[2], plain[2], atol=1e-4)
    assert torch.allclose(windowed[3], plain[3], atol=1e-6)


@pytest.mark.parametrize("name", ["wan"])
def test_cached_mode_on_wan_matches_guidance_on_computed_steps(name):
    model, inputs = build(name)
    bmap = _guided_map(model, inputs)
    x = inputs["hidden_states"]
    calls = [{**inputs, "hidden_states": x + 0.1 * i, "timestep": torch.tensor([900 - 60 * i])} for i in range(3)]
    guided, _ = _outputs(model, bmap, calls, "guidance")
    cached, guide = _outputs(model, bmap, calls, "cached")
    plain = [run(model, c) for c in calls]
    assert torch.equal(cached[0], guided[0]) and guide.extra_passes == 1
    assert torch.allclose(cached[2], plain[2] + (guided[0] - plain[0]), atol=1e-5)


def test_compiled_denoiser_computes_the_contrast_every_step():
    """Under torch.compile the cache cannot key on tensor memory: every step is computed, as in "guidance"."""
    model, inputs = build("sd")
    bmap = _guided_map(model, inputs)
    calls = _steps(inputs, 3)
    guided, _ = _outputs(model, bmap, calls, "guidance")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    apply_knob(compiled, bmap, fidelity_mode="cached")
    set_fidelity(compiled, F)
    outs = [run(compiled, c) for c in calls]
    assert get_knob(compiled) is not None
    remove_knob(compiled)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs, guided, strict=True))
