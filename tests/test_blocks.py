"""memctl.blocks: residual units and stages of every supported family; errors for unknown models and names."""

import doctest
from types import SimpleNamespace

import pytest
import torch

import memctl.blocks
from memctl.blocks import Block, find_blocks
from tests.tiny import FAMILIES, build

UNET_STAGES = {"in", "down", "mid", "up"}


class Residual(torch.nn.Module):
    """A residual layer of a made-up architecture: out = x + lin(x)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, hidden_states):
        return hidden_states + self.lin(hidden_states)


class Toy(torch.nn.Module):
    """An architecture memctl does not know: blocks must be named by hand."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Residual(), Residual()])

    def forward(self, x, timestep=None):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("family", list(FAMILIES))
def test_units_and_stages_are_sane(family):
    model, _ = build(family)
    units, stages = find_blocks(model), find_blocks(model, "stage")
    assert units
    assert stages
    assert [u.index for u in units] == list(range(len(units)))
    assert [s.index for s in stages] == list(range(len(stages)))
    assert {u.kind for u in units} <= {"resnet", "attention", "transformer", "motion", "temporal"}
    modules = dict(model.named_modules())
    for u in units:
        assert u.name in modules
        assert u.target in modules
        assert u.units == ()
        assert u.leaves() == (u,)
    # stages partition the units, in order
    assert [leaf for s in stages for leaf in s.leaves()] == units
    assert all(s.kind == "stage" for s in stages)
    if family in ("unet2d", "sd", "sdxl", "motion", "unet3d"):
        assert {u.stage for u in units} <= UNET_STAGES
        assert {"down", "mid", "up"} <= {u.stage for u in units}
        assert all(u.mode == "branch" for u in units)
        assert {"mid_block", "up_blocks.0", "down_blocks.1"} <= {s.name for s in stages}
    else:
        assert {u.kind for u in units} == {"transformer"}
        assert all(u.mode == "delta" for u in units)


def test_family_specifics():
    flux = find_blocks(build("flux")[0])
    assert [u.stage for u in flux] == ["double", "double", "single", "single"]
    assert all((u.output_index, u.encoder_index) == (1, 0) for u in flux)
    assert [(u.output_index, u.encoder_index) for u in find_blocks(build("sd3")[0])] == [(1, 0), (1, 0)]
    assert [(u.output_index, u.encoder_index) for u in find_blocks(build("cogvideox")[0])] == [(0, 1), (0, 1)]
    assert [u.name for u in find_blocks(build("wan")[0])] == ["blocks.0", "blocks.1"]
    assert {u.kind for u in find_blocks(build("motion")[0])} == {"resnet", "attention", "motion"}
    unet3d = find_blocks(build("unet3d")[0])
    assert unet3d[0].name == "transformer_in"
    assert unet3d[0].stage == "in"
    assert {u.kind for u in unet3d} == {"resnet", "attention", "temporal"}
    assert find_blocks(build("unet3d")[0], "stage")[0].name == "transformer_in"
    unet2d = {u.name: u for u in find_blocks(build("unet2d")[0])}
    assert unet2d["mid_block.attentions.0"].target == "mid_block.attentions.0.to_out.0"
    assert unet2d["up_blocks.0.resnets.1"].target == "up_blocks.0.resnets.1.conv2"
    assert find_blocks(build("sd")[0], names=["mid_block.attentions.0"])[0].target == "mid_block.attentions.0.proj_out"
    assert [s.name for s in find_blocks(build("dit")[0], "stage")] == [
        f"transformer_blocks[{i}:{i + 1}]" for i in range(3)
    ]


def test_names_pick_units_stages_and_custom_modules():
    model, _ = build("sd")
    picked = find_blocks(model, names=["up_blocks.0", "mid_block.resnets.1"])
    assert [b.name for b in picked] == ["up_blocks.0", "mid_block.resnets.1"]
    assert picked[0].kind == "stage"
    assert len(picked[0].units) == 4
    custom = find_blocks(Toy(), names=["layers.1"])
    assert custom == [Block("layers.1", "custom", "custom", 0, mode="delta")]


def test_compiled_model_is_unwrapped():
    model, _ = build("wan")
    assert find_blocks(torch.compile(model)) == find_blocks(model)


def test_unknown_model_says_what_was_looked_for():
    with pytest.raises(ValueError, match=r"Expected a denoiser with residual blocks .* but got Toy") as e:
        find_blocks(Toy())
    assert "names=[...]" in str(e.value)
    assert "layers" in str(e.value)
    assert "down_blocks" in str(e.value)


def test_unknown_name_lists_close_matches():
    model, _ = build("sd")
    with pytest.raises(ValueError, match=r"but got 'up_blocks.0.resnet.1'.*Close matches: up_blocks.0.resnets.1"):
        find_blocks(model, names=["up_blocks.0.resnet.1"])


@pytest.mark.parametrize("bad", ["units", "", None])
def test_bad_granularity(bad):
    with pytest.raises(ValueError, match="Expected granularity 'unit' or 'stage', but got"):
        find_blocks(build("wan")[0], bad)


def test_not_a_module():
    with pytest.raises(TypeError, match="Expected a torch.nn.Module denoiser"):
        find_blocks("unet")


def test_docstring_examples():
    sdxl = build("sdxl")[0]
    globs = {"pipe": SimpleNamespace(unet=sdxl), "unet": sdxl, "toy": Toy()}
    result = doctest.testmod(memctl.blocks, extraglobs=globs)
    assert result.failed == 0
    assert result.attempted > 0
