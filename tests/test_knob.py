"""memctl.knob: exact at fidelity 0, idempotent, removable, windowed, compile-stable, shared through from_pipe."""

import doctest
import json
from types import SimpleNamespace

import pytest
import torch

import memctl.knob
import memctl.knob_state
from memctl.blockmap import BlockMap
from memctl.blocks import find_blocks
from memctl.hooks import list_hooks, scaled
from memctl.knob import apply_knob, fidelity, get_knob, knob_law, remove_knob, set_fidelity
from tests.test_hooks import _pristine
from tests.tiny import FAMILIES, build, doc_globs, run, tiny_sd_pipeline


def _map(model, granularity="unit", seed=0):
    """A map with seeded random scores of both signs."""
    blocks = find_blocks(model, granularity)
    scores = torch.randn(len(blocks), generator=torch.Generator().manual_seed(seed))
    return BlockMap.from_scores(model, {b.name: float(s) for b, s in zip(blocks, scores, strict=True)})


def _at(inputs, level):
    """The same inputs at another noise level (inputs are built at level 0.5)."""
    return {**inputs, "timestep": inputs["timestep"] * (level / 0.5)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_knob_on_every_family(family):
    model, inputs = build(family)
    ref, ref_low = run(model, inputs), run(model, _at(inputs, 0.2))
    bmap = _map(model)
    apply_knob(model, bmap)
    assert torch.equal(run(model, inputs), ref)  # fidelity 0: bit for bit
    set_fidelity(model, -0.8)
    changed = run(model, inputs)
    assert not torch.equal(changed, ref)
    apply_knob(model, bmap)  # twice: the first is replaced, and fidelity starts again at 0
    assert torch.equal(run(model, inputs), ref)
    set_fidelity(model, -0.8)
    assert torch.equal(run(model, inputs), changed)
    assert len(list_hooks(model)) == bmap.n_blocks + 1
    apply_knob(model, bmap, start=0.0, stop=0.3)  # t = 0.5 lies outside the window: untouched
    set_fidelity(model, -0.8)
    assert torch.equal(run(model, inputs), ref)
    assert not torch.equal(run(model, _at(inputs, 0.2)), ref_low)  # t = 0.2 lies inside
    remove_knob(model)
    assert torch.equal(run(model, inputs), ref)
    assert _pristine(model)
    assert get_knob(model) is None


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_window_acts_inside_only(family):
    model, inputs = build(family)
    low = _at(inputs, 0.2)
    ref_low, ref_mid = run(model, low), run(model, inputs)
    apply_knob(model, _map(model, "stage"), start=0.1, stop=0.3)
    set_fidelity(model, 1.0)
    assert not torch.equal(run(model, low), ref_low)
    assert torch.equal(run(model, inputs), ref_mid)
    remove_knob(model)


def test_per_level_scores_are_interpolated_at_the_current_noise_level():
    model, inputs = build("unet2d")
    blocks = find_blocks(model)
    top = torch.linspace(-1, 1, len(blocks))
    bmap = BlockMap.from_scores(
        model, {b.name: [0.0, float(s)] for b, s in zip(blocks, top, strict=True)}, levels=[0, 1]
    )
    with scaled(model, blocks, 1.0, name="memctl.reference") as scales:  # the factors the law gives at t = 0.5
        for b, s in zip(blocks, top, strict=True):
            scales.set(b, float(knob_law(torch.tensor([0.5 * s]), -0.6, scale=1.0)))
        expected = run(model, inputs)
    apply_knob(model, bmap)
    set_fidelity(model, -0.6)
    assert torch.allclose(run(model, inputs), expected, atol=1e-5)
    assert not torch.allclose(run(model, _at(inputs, 0.9)), expected, atol=1e-3)
    remove_knob(model)


def test_knob_law():
    scores = torch.tensor([[2.0, -4.0], [0.0, 1.0]])
    assert torch.equal(knob_law(scores, 0.0), torch.ones(2, 2))  # exactly 1.0
    assert torch.allclose(knob_law(scores, -1.0), torch.tensor([[0.5, 2.0], [1.0, 0.75]]))
    assert torch.equal(knob_law(scores, 1.0, strength=10.0), torch.tensor([[2.0, 0.0], [1.0, 2.0]]))  # clamped
    assert torch.equal(knob_law(torch.zeros(3), 1.0), torch.ones(3))


def test_fidelity_context_restores_the_previous_value_even_on_error():
    model, inputs = build("wan")
    apply_knob(model, _map(model), strength=0.5, start=0.1, stop=0.9)
    set_fidelity(model, 0.25)
    with pytest.raises(RuntimeError), fidelity(model, -1.0):
        assert get_knob(model).fidelity == -1.0
        raise RuntimeError
    info = get_knob(model)
    assert (info.fidelity, info.strength, info.start, info.stop) == (0.25, 0.5, 0.1, 0.9)
    assert json.loads(json.dumps(info.to_dict()))["window"] == [0.1, 0.9]
    remove_knob(model)


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -1.01, float("inf"), "0.5", True, None])
def test_bad_fidelity(bad):
    model, _ = build("wan")
    apply_knob(model, _map(model))
    with pytest.raises(ValueError, match=r"Expected fidelity in \[-1, 1\], but got"):
        set_fidelity(model, bad)
    remove_knob(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strength": -1.0}, "Expected a finite strength >= 0"),
        ({"strength": float("nan")}, "Expected a finite strength >= 0"),
        ({"start": 0.6, "stop": 0.4}, "Expected start <= stop"),
        ({"stop": 1.5}, r"Expected stop in \[0, 1\]"),
    ],
)
def test_bad_knob_arguments(kwargs, match):
    model, _ = build("wan")
    with pytest.raises(ValueError, match=match):
        apply_knob(model, _map(model), **kwargs)
    assert _pristine(model)


def test_misuse_is_a_clear_error():
    model, _ = build("wan")
    with pytest.raises(ValueError, match="Expected a knob on WanTransformer3DModel, but none is applied"):
        set_fidelity(model, 0.5)
    with pytest.raises(ValueError, match="This map was made for a different model"):
        apply_knob(model, _map(build("wan", seed=1)[0]))
    assert _pristine(model)
    with pytest.raises(TypeError, match="Expected a memctl.BlockMap"):
        apply_knob(model, {"blocks.0": 1.0})
    with pytest.raises(ValueError, match="Expected a pipeline with a denoiser"):
        apply_knob(object(), _map(model))
    remove_knob(model)  # without a knob: a no-op


def test_two_experts_get_one_knob():
    a, b = build("wan")[0], build("wan", seed=1)[0]
    pipe = SimpleNamespace(transformer=a, transformer_2=b, scheduler=None)
    both = BlockMap.combine(_map(a), BlockMap.from_scores(b, {"blocks.1": -1.0}, component="transformer_2"))
    apply_knob(pipe, both)
    set_fidelity(pipe, 0.5)
    assert get_knob(pipe).components == ("transformer", "transformer_2")
    assert get_knob(b).fidelity == 0.5
    with pytest.raises(ValueError, match="Expected a map of one denoiser for a bare module"):
        apply_knob(a, both)
    apply_knob(pipe, _map(a))  # a map of one expert replaces the knob on both
    assert get_knob(pipe).components == ("transformer",)
    assert _pristine(b)
    remove_knob(pipe)
    assert _pristine(a)
    assert _pristine(b)


def test_knob_follows_dtype_moves():
    model, inputs = build("sd")
    blocks = find_blocks(model)
    apply_knob(model, BlockMap.from_scores(model, {b.name: [1.0, -1.0] for b in blocks[::2]}, levels=[0.25, 0.75]))
    set_fidelity(model, -0.5)
    knobbed = run(model, inputs)
    model.to(torch.float64)
    out = run(model, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    assert torch.allclose(out.float(), knobbed, atol=1e-4)
    remove_knob(model)


def test_fidelity_changes_do_not_recompile():
    model, inputs = build("dit")
    apply_knob(model, _map(model))
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    eager = {}
    for f in (0.0, 0.5, -0.7):
        set_fidelity(model, f)
        eager[f] = run(model, inputs)
    outs = {}
    for f in (0.0, 0.5, -0.7):
        set_fidelity(compiled, f)
        outs[f] = run(compiled, inputs)
    assert len(compiles) == 1
    assert all(torch.equal(outs[f], eager[f]) for f in outs)
    assert not torch.equal(outs[0.5], outs[0.0])
    remove_knob(compiled)
    torch._dynamo.reset()


def test_knob_survives_from_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def sample(p):
        return p(
            "ab",
            num_inference_steps=3,
            height=8,
            width=8,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    ref = sample(pipe)
    apply_knob(pipe, _map(pipe.unet, "stage"))
    assert torch.equal(sample(pipe), ref)
    set_fidelity(pipe, -0.9)
    knobbed = sample(pipe)
    assert not torch.equal(knobbed, ref)
    other = StableDiffusionPipeline.from_pipe(pipe)
    assert other.unet is pipe.unet
    assert get_knob(other).fidelity == -0.9
    assert torch.equal(sample(other), knobbed)
    remove_knob(other)
    assert torch.equal(sample(pipe), ref)
    assert _pristine(pipe.unet)


@pytest.mark.parametrize("module", [memctl.knob, memctl.knob_state], ids=lambda m: m.__name__)
def test_docstring_examples(tmp_path, module):
    result = doctest.testmod(module, extraglobs=doc_globs(tmp_path))
    assert result.failed == 0
    assert result.attempted > 0


def _condition_map(model, inputs, seed=0):
    """A condition-lever map of a tiny denoiser (every unit with cross-attention): memorized directions fit from
    random text states of its inputs' shape (for tiny Wan that is also what `attn2` reads: text_dim = inner dim)."""
    from memctl.hooks import cross_attentions
    from memctl.subspace import fit_subspace, weight_threshold

    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(6, *inputs["encoder_hidden_states"].shape[1:], generator=gen)  # (P, L, D)
    mem = bank[:3].clone()
    mem[..., 0] += 4.0
    sub = fit_subspace(mem, bank, k=2)
    blocks = find_blocks(model)
    bmap = BlockMap.from_scores(model, {b.name: 1.0 for b in blocks if cross_attentions(model, b)})
    bmap.lever = "condition"
    bmap.lever_tensors = {"read": sub.read, "tau": weight_threshold(bank, sub.read), "bank": bank,
                          "g_inv_half": sub.g_inv_half}  # fmt: skip
    bmap.__post_init__()
    return bmap


@pytest.mark.parametrize("family", ["sd", "wan"])
def test_condition_knob_computes_the_pull_once_per_conditioning(family, monkeypatch):
    """Token weights and nearest general conditioning: once per distinct conditioning, not once per unit and step
    (Wan's `attn2` reads a text projection made anew in every forward: still once); outputs bit-identical to
    computing them in every cross-attention call; an in-place edit of the text states is seen."""
    import memctl.hooks
    import memctl.subspace

    model, inputs = build(family)
    bmap = _condition_map(model, inputs)
    calls = []
    real = memctl.subspace.pull_parts
    monkeypatch.setattr(memctl.subspace, "pull_parts", lambda *a: calls.append(1) or real(*a))
    apply_knob(model, bmap)
    set_fidelity(model, -1.0)
    cached = [run(model, inputs) for _ in range(3)]
    n_units = sum(1 for _, n in list_hooks(model) if n == "memctl.knob")
    assert n_units >= 2
    assert len(calls) == 1  # three calls × every unit, one computation
    knob_hooks = [model.get_submodule(p)._diffusers_hook.hooks[n] for p, n in list_hooks(model) if n == "memctl.knob"]
    assert len(knob_hooks[0].cache.entries) == 1  # Wan: the earlier forwards' projections are not kept alive
    before = inputs["encoder_hidden_states"].clone()
    inputs["encoder_hidden_states"].mul_(1.5)  # same tensor, new values: recomputed
    edited = run(model, inputs)
    assert len(calls) == 2
    monkeypatch.setattr(memctl.hooks.PullCache, "parts", lambda self, e, r, t, b: real(e, r, t, b))
    assert torch.equal(run(model, inputs), edited)
    inputs["encoder_hidden_states"].copy_(before)
    assert all(torch.equal(run(model, inputs), c) for c in cached)
    remove_knob(model)
    assert _pristine(model)


@pytest.mark.parametrize("f", [-1.0, 1.0])
def test_cached_pull_is_bit_identical_on_the_digits_testbed(f, monkeypatch):
    import memctl.hooks
    from memctl.subspace import pull_parts
    from memctl.zoo import load_testbed

    tb = load_testbed("digits")
    pipe = tb.pipeline()
    apply_knob(pipe, tb.block_map())
    prompts = [tb.canaries[0][0], tb.prompt(3)]

    def sample(at=f):
        return pipe(prompts, num_inference_steps=3, guidance_scale=2.0, output_type="pt", fidelity=at,
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    cached = sample()
    monkeypatch.setattr(memctl.hooks.PullCache, "parts", lambda self, e, r, t, b: pull_parts(e, r, t, b))
    assert torch.equal(sample(), cached)
    assert not torch.equal(sample(0.0), cached)  # the knob did act
    remove_knob(pipe)


def compiled_sweep(model, inputs, fidelities) -> tuple[int, dict, dict]:
    """A knobbed `model` run eagerly, then compiled (fullgraph), at each of `fidelities` in turn: the number of
    graphs compiled and the eager and compiled outputs per fidelity. The knob is removed after."""
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    eager, outs = {}, {}
    for f in dict.fromkeys(fidelities):
        set_fidelity(model, f)
        eager[f] = run(model, inputs)
    for f in fidelities:
        set_fidelity(compiled, f)
        outs[f] = run(compiled, inputs)
    remove_knob(compiled)
    torch._dynamo.reset()
    return len(compiles), eager, outs


@pytest.mark.parametrize("name", ["sd", "wan"])
def test_condition_knob_does_not_recompile(name):
    model, inputs = build(name)
    apply_knob(model, _condition_map(model, inputs))
    compiles, eager, outs = compiled_sweep(model, inputs, (0.0, -0.5, -1.0, -0.5))
    assert compiles == 1
    assert all(torch.allclose(outs[f], eager[f], atol=1e-6) for f in outs)
    assert not torch.equal(outs[-1.0], outs[0.0])
