"""memctl.hooks: exact at scale 1, always removed, scales change in place, recording, the timestep probe."""

import doctest

import pytest
import torch

import memctl.hooks
import memctl.registry
from memctl.blocks import find_blocks
from memctl.hooks import RecordHook, TimestepHook, attach, attached, detach, list_hooks, recorded, scaled
from tests.test_blocks import Toy
from tests.tiny import FAMILIES, build, doc_globs, run


def _pristine(model):
    """No hook registry, instance-level forward or memctl buffer left anywhere."""
    return all("forward" not in m.__dict__ and "_diffusers_hook" not in m.__dict__ for m in model.modules()) and not [
        n for n, _ in model.named_buffers() if "memctl" in n
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scaling_is_exact_at_one_and_comes_off(family):
    model, inputs = build(family)
    ref = run(model, inputs)
    blocks = find_blocks(model)
    with scaled(model, blocks, 1.0) as scales:
        assert len(list_hooks(model)) == len(blocks)
        assert torch.equal(run(model, inputs), ref)
        scales.set(blocks[-1], 0.0)  # in place: nothing re-registered
        ablated = run(model, inputs)
        scales.set(blocks[-1], 1.0)
        assert torch.equal(run(model, inputs), ref)
    assert not torch.equal(ablated, ref)
    with scaled(model, find_blocks(model, "stage"), 0.5):
        assert not torch.equal(run(model, inputs), ref)
    assert list_hooks(model) == []
    assert _pristine(model)
    assert torch.equal(run(model, inputs), ref)


@pytest.mark.parametrize("family", ["sd", "flux", "unet3d"])
def test_hooks_come_off_when_the_forward_raises(family):
    model, inputs = build(family)
    ref = run(model, inputs)
    bad = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][..., :3]}  # wrong width: raises inside
    with pytest.raises(RuntimeError), scaled(model, find_blocks(model), 0.0):
        run(model, bad)
    assert list_hooks(model) == []
    assert _pristine(model)
    assert torch.equal(run(model, inputs), ref)


def test_delta_ablation_skips_the_block_and_recording_reads_the_update():
    model, x = Toy(), torch.randn(3, 4)
    blocks = find_blocks(model, names=["layers.0", "layers.1"])
    with torch.no_grad():
        with scaled(model, blocks[:1], 0.0):
            assert torch.allclose(
                model(x), model.layers[1](x), atol=1e-6
            )  # out - (out - inp): exact only up to rounding
        with recorded(model, blocks) as res, recorded(model, blocks, what="output", name="memctl.out") as out:
            y = model(x)
        h = model.layers[0](x)
        assert torch.allclose(res["layers.0"][0], model.layers[0].lin(x), atol=1e-6)
        assert torch.equal(out["layers.0"][0], h)
        assert torch.equal(out["layers.1"][0], y)
        assert torch.equal(res["layers.1"][0], y - h)
    assert _pristine(model)


def test_recorded_with_reduce_on_every_unit():
    model, inputs = build("sdxl")
    blocks = find_blocks(model)
    with (
        recorded(model, blocks, reduce=lambda r: r.pow(2).mean()) as rec,
        recorded(model, blocks, what="output", name="memctl.out") as out,
    ):
        run(model, inputs)
        run(model, inputs)
    assert list(rec) == [b.name for b in blocks]
    assert all(len(v) == 2 and v[0].ndim == 0 for v in rec.values())
    assert out["mid_block.resnets.0"][0].shape == (2, 16, 4, 4)
    assert _pristine(model)


@pytest.mark.parametrize("family, scale", [("sd", 1000.0), ("flux", 1.0), ("wan", 1000.0)])
def test_timestep_hook_reads_the_noise_level(family, scale):
    model, inputs = build(family)
    seen = []
    with attached(model, {"": TimestepHook(lambda m, t: seen.append(t), scale)}, "memctl.t"):
        run(model, inputs)
        assert list_hooks(model) == [("", "memctl.t")]
    assert len(seen) == 1
    assert seen[0].ndim == 0
    assert float(seen[0]) == pytest.approx(0.5)
    assert _pristine(model)


def test_nested_contexts_with_one_name_on_one_module_are_refused_and_leave_the_outer_intact():
    model, inputs = build("unet2d")
    blocks = find_blocks(model)
    with scaled(model, blocks[:2], 0.0):
        before = list_hooks(model)
        with pytest.raises(ValueError, match="Expected no hook named 'memctl.scale'"), scaled(model, blocks[1:3], 0.5):
            pass
        assert list_hooks(model) == before
    assert _pristine(model)


def test_attach_is_all_or_nothing_and_detach_by_name():
    model, _ = build("unet2d")
    blocks = find_blocks(model)
    hooks = {b.target: RecordHook(b, []) for b in blocks[:3]}
    with pytest.raises(AttributeError):
        attach(model, {**hooks, "no.such.module": RecordHook(blocks[3], [])}, "memctl.rec")
    assert list_hooks(model) == []
    assert _pristine(model)
    attach(model, hooks, "memctl.rec")
    assert sorted(list_hooks(model)) == sorted((b.target, "memctl.rec") for b in blocks[:3])
    detach(model, "memctl.rec")
    assert _pristine(model)


def test_overlapping_blocks_are_refused():
    model, _ = build("unet2d")
    stage = find_blocks(model, names=["mid_block"])[0]
    with (
        pytest.raises(ValueError, match="Expected blocks that do not overlap"),
        scaled(model, [stage, stage.units[0]]),
    ):
        pass
    assert _pristine(model)


def test_removing_under_a_later_new_forward_hook_warns():
    """diffusers' removal bug (see `memctl.registry.detach`): a later hook with new_forward would be silenced, so
    memctl says so."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Replacing(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            return self.fn_ref.original_forward(*args, **kwargs)

    model, _ = build("unet2d")
    block = find_blocks(model)[0]
    with pytest.warns(UserWarning, match="replace forward"), scaled(model, [block], 0.5):
        HookRegistry.check_if_exists_or_initialize(model.get_submodule(block.target)).register_hook(Replacing(), "x")
    assert list_hooks(model, prefix="") == [(block.target, "x")]


@pytest.mark.parametrize("module", [memctl.hooks, memctl.registry], ids=lambda m: m.__name__)
def test_docstring_examples(tmp_path, module):
    result = doctest.testmod(module, extraglobs=doc_globs(tmp_path))
    assert result.failed == 0
    assert result.attempted > 0
