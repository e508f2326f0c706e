"""memctl.blockmap: construction, save/load, fingerprints, shuffled controls, clear errors."""

import doctest
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import memctl.blockmap
import memctl.experts
import memctl.fingerprints
import memctl.lever_config
from memctl.blockmap import BlockMap, fingerprint
from memctl.blocks import find_blocks
from tests.tiny import build, doc_globs


@pytest.fixture(scope="module")
def unet():
    return build("sd")[0]


@pytest.fixture(scope="module")
def bmap(unet):
    scores = {b.name: (i - 5) / 3 for i, b in enumerate(find_blocks(unet))}
    return BlockMap.from_scores(unet, scores, method="test", meta={"probes": 3})


def test_from_scores(unet, bmap):
    assert bmap.n_blocks == 12
    assert bmap.scores.shape == (12, 1)
    assert not bmap.per_level
    assert bmap.granularity == "unit"
    assert bmap.method == "test"
    assert bmap.components == ["unet"] * 12
    assert bmap.fingerprint == fingerprint(unet)
    assert bmap.kinds[0] == "resnet"
    stages = BlockMap.from_scores(unet, {"mid_block": 1.0, "up_blocks.0": -1.0})
    assert stages.granularity == "stage"
    assert stages.kinds == ["stage", "stage"]
    mixed = BlockMap.from_scores(unet, {"mid_block": 1.0, "up_blocks.0.resnets.0": -1.0})
    assert mixed.granularity == "mixed"
    assert BlockMap.from_scores(build("wan")[0], {"blocks.0": 1.0}).components == ["transformer"]


def test_per_level_scores(unet):
    m = BlockMap.from_scores(unet, {"mid_block": [0.1, 0.9], "up_blocks.0": 0.5}, levels=[0.2, 0.8])
    assert m.per_level
    assert torch.allclose(m.scores, torch.tensor([[0.1, 0.9], [0.5, 0.5]]))
    assert m.levels.tolist() == pytest.approx([0.2, 0.8])
    with pytest.raises(ValueError, match=r"Expected levels=\[...\]"):
        BlockMap.from_scores(unet, {"mid_block": [0.1, 0.9]})
    with pytest.raises(ValueError, match="Expected 1 or 2 scores per block"):
        BlockMap.from_scores(unet, {"mid_block": [0.1, 0.9, 0.3]}, levels=[0.2, 0.8])
    with pytest.raises(ValueError, match="ascending noise levels in"):
        BlockMap.from_scores(unet, {"mid_block": [0.1, 0.9]}, levels=[0.8, 0.2])


def test_save_load_round_trip(tmp_path, unet, bmap):
    for m in (bmap, BlockMap.from_scores(unet, {"mid_block": [0.1, -0.9]}, levels=[0.0, 1.0])):
        path = tmp_path / "map.safetensors"
        m.save(path)
        assert BlockMap.load(path) == m
        m.save(path)  # overwrite in place
        assert BlockMap.load(str(path)) == m
    assert os.listdir(tmp_path) == ["map.safetensors"]  # the temporary file was renamed, not left behind
    with safe_open(path, framework="pt") as f:  # plain safetensors + JSON metadata
        assert f.metadata()["format"] == "memctl.blockmap"
        assert "scores" in f.keys()
        json.loads(f.metadata()["blockmap"])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected a block map file at"):
        BlockMap.load(tmp_path / "missing.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="Expected a memctl block map"):
        BlockMap.load(tmp_path / "corrupt.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="Expected a memctl block map .* no 'memctl.blockmap' metadata"):
        BlockMap.load(tmp_path / "weights.safetensors")


def test_fingerprint_mismatch_is_a_clear_error(unet, bmap):
    bmap.check_model(unet)
    other, _ = build("sd", seed=1)
    with pytest.raises(ValueError, match=r"This map was made for a different model: .* \(its weights differ\)"):
        bmap.check_model(other)
    with pytest.raises(ValueError, match=r"different model: .* \(its config differs\)"):
        bmap.check_model(build("sdxl")[0], "unet")
    assert fingerprint(build("sd")[0]) == bmap.fingerprint  # deterministic across builds


def test_dtype_cast_of_the_same_weights_still_matches(bmap):
    for dtype in (torch.float16, torch.bfloat16):
        bmap.check_model(build("sd")[0].to(dtype))


def test_shuffled_is_a_permutation_control(bmap):
    control = bmap.shuffled(seed=1)
    assert control.names == bmap.names
    assert control.kinds == bmap.kinds
    assert control.fingerprints == bmap.fingerprints
    assert sorted(control.scores.flatten().tolist()) == sorted(bmap.scores.flatten().tolist())
    assert not torch.equal(control.scores, bmap.scores)
    assert control == bmap.shuffled(seed=1)
    assert control != bmap.shuffled(seed=2)
    assert control.meta["control"]["shuffled_seed"] == 1
    assert control.meta["probes"] == 3


@pytest.mark.parametrize(
    "scores, kwargs, error, match",
    [
        ({"up_blocks.0.resnet.1": 1.0}, {}, ValueError, "Close matches: up_blocks.0.resnets.1"),
        ({"mid_block": float("nan")}, {}, ValueError, "Expected finite scores"),
        ({}, {}, ValueError, "Expected at least one"),
        ({"mid_block": 1.0, "mid_block.resnets.0": 1.0}, {}, ValueError, "Expected blocks that do not overlap"),
        ({"mid_block": 1.0}, {"meta": {"bad": object()}}, ValueError, "Expected meta to be JSON-serialisable"),
    ],
)
def test_bad_input_is_a_clear_error(unet, scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        BlockMap.from_scores(unet, scores, **kwargs)


def test_table_and_to_dict(bmap):
    table = bmap.table()
    assert "up_blocks.1.resnets.1" in table
    assert "+2.000" in table
    assert "-1.667" in table
    assert "method test" in table
    assert json.loads(json.dumps(bmap.to_dict()))["names"] == bmap.names


def test_combine_and_select_for_two_experts():
    a, b = build("wan")[0], build("wan", seed=1)[0]
    ma = BlockMap.from_scores(a, {"blocks.0": 1.0})
    mb = BlockMap.from_scores(b, {"blocks.1": -1.0}, component="transformer_2")
    both = BlockMap.combine(ma, mb)
    assert both.components == ["transformer", "transformer_2"]
    assert both.fingerprints["transformer_2"] == mb.fingerprint
    part = both.select("transformer_2")
    assert part.names == ["blocks.1"]
    assert torch.equal(part.scores, mb.scores)
    assert part.fingerprint == mb.fingerprint
    assert "transformer_2:blocks.1" in both.table()
    with pytest.raises(ValueError, match="Expected a map of one denoiser"):
        _ = both.fingerprint
    with pytest.raises(ValueError, match="Expected maps of distinct components"):
        BlockMap.combine(ma, ma)


@pytest.mark.parametrize(
    "module", [memctl.blockmap, memctl.experts, memctl.fingerprints, memctl.lever_config], ids=lambda m: m.__name__
)
def test_docstring_examples(tmp_path, module):
    result = doctest.testmod(module, extraglobs=doc_globs(tmp_path))
    assert result.failed == 0
    assert result.attempted > 0


def _condition_map(unet, bmap) -> BlockMap:
    """`bmap` with a well-formed condition lever (read (D, k), tau (), bank (P, L, D), g_inv_half (D, D))."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "read": torch.randn(8, 2, generator=g),
        "tau": torch.tensor(0.5),
        "bank": torch.randn(3, 4, 8, generator=g),
        "g_inv_half": torch.eye(8),
    }
    return BlockMap(
        bmap.names,
        bmap.scores,
        None,
        bmap.kinds,
        bmap.components,
        bmap.fingerprints,
        samples=dict(bmap.samples),
        lever="condition",
        lever_tensors=tensors,
    )


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("levels", torch.tensor([float("nan"), 0.5]), r"ascending noise levels in \[0, 1\] in tensor `levels`"),
        ("lever.read", torch.full((8, 2), float("nan")), r"Expected finite values in tensor `lever.read`"),
        ("lever.tau", torch.tensor(float("nan")), r"Expected finite values in tensor `lever.tau`"),
        ("lever.bank", torch.tensor([[[float("inf")] * 8]]), r"Expected finite values in tensor `lever.bank`"),
        ("lever.read", torch.ones(8), r"Expected tensor `lever.read` of shape \(D, k\)"),
        ("lever.tau", torch.ones(2), r"Expected tensor `lever.tau` of shape \(\)"),
        ("lever.tau", torch.tensor(0.0), r"`lever.tau` of shape \(\) holding a number > 0, but got \(\) holding 0.0"),
        ("lever.bank", torch.ones(3, 4, 7), r"Expected tensor `lever.bank` of shape \(P, L, D=8\)"),
        ("lever.g_inv_half", torch.eye(7), r"Expected tensor `lever.g_inv_half` of shape \(D, D\) = \(8, 8\)"),
        ("lever.read", torch.ones(8, 2, dtype=torch.int64), r"floating-point tensor `lever.read`, but got dtype"),
        ("sample.unet", torch.tensor([1.0, float("nan")]), r"Expected finite values in tensor `sample.unet`"),
        ("sample.unet", torch.ones(2, 2), r"Expected tensor `sample.unet` of shape \(N,\)"),
    ],
)
def test_damaged_tensors_in_a_map_file_are_named(tmp_path, unet, bmap, key, value, match):
    """NaN or misshapen tensors (which would render black images) are refused at load, naming the tensor."""
    good = _condition_map(unet, bmap)
    path = tmp_path / "map.safetensors"
    good.save(path)
    assert BlockMap.load(path) == good
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if key == "levels":  # a per-level map: two score columns
        tensors["scores"] = torch.cat([tensors["scores"]] * 2, dim=1)
    tensors[key] = value
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=match):
        BlockMap.load(path)


def test_saved_map_respects_the_umask(tmp_path, bmap):
    old = os.umask(0o002)
    try:
        bmap.save(tmp_path / "map.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "map.safetensors").stat().st_mode & 0o777 == 0o664


def _mutate_map_file(rng, path, tensors: dict, metadata: dict) -> None:
    """Rewrite `path` as one random mutation of a saved map: a tensor's values, shape or dtype, a metadata field,
    a dropped key, or flipped bytes."""
    import copy

    tensors = {k: v.clone() for k, v in tensors.items()}
    info = json.loads(metadata["blockmap"])
    metadata = dict(metadata)
    kind = rng.randrange(6)
    key = rng.choice(sorted(tensors))
    if kind == 0:  # NaN / inf / huge / negative values
        t = tensors[key].reshape(-1)
        if t.numel():
            t[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30, -1.0, 0.0])
    elif kind == 1:  # another shape
        t = tensors[key]
        tensors[key] = rng.choice([t.reshape(-1), t.reshape(-1)[:1], t.unsqueeze(0), torch.zeros(()), torch.zeros(0)])
    elif kind == 2:  # another dtype
        tensors[key] = tensors[key].to(rng.choice([torch.int64, torch.float16, torch.bool, torch.float64]))
    elif kind == 3:  # a key dropped
        del tensors[key]
    elif kind == 4:  # a metadata field changed
        field = rng.choice(sorted(info))
        info = copy.deepcopy(info)
        doubled = info[field] * 2 if isinstance(info[field], (str, list)) else info[field]
        info[field] = rng.choice([None, 3, "x", [], {}, ["x"] * 50, "condition", doubled])
        metadata["blockmap"] = json.dumps(info)
    else:
        metadata[rng.choice(["format", "version", "blockmap"])] = rng.choice(["", "9", "{", "memctl.blockmap"])
    save_file(tensors, path, metadata=metadata)
    if kind == 5 and rng.random() < 0.5:  # and some flipped bytes
        data = bytearray(path.read_bytes())
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))


def test_fuzzed_map_files_give_clean_errors_or_sound_maps(tmp_path, unet, bmap):
    """200 random mutations (fixed seed) of a saved condition map: a ValueError naming what was expected, or a map
    whose every tensor is finite with the shapes the lever reads; never another exception."""
    import random

    good = _condition_map(unet, bmap)
    path = tmp_path / "map.safetensors"
    good.save(path)
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    rng, outcomes = random.Random(16), {"error": 0, "loaded": 0}
    for k in range(200):
        _mutate_map_file(rng, path, tensors, metadata)
        try:
            m = BlockMap.load(path)
        except ValueError as err:
            outcomes["error"] += 1
            assert str(err).startswith("Expected a memctl block map"), (k, str(err)[:300])
            assert len(str(err)) < 5000, (k, str(err)[:300])
            continue
        outcomes["loaded"] += 1
        assert torch.isfinite(m.scores).all(), k
        assert m.scores.shape[0] == m.n_blocks, k
        for t in [*m.lever_tensors.values(), *m.samples.values()]:
            assert t.is_floating_point(), k
            assert torch.isfinite(t).all(), k
        if m.lever == "condition":
            d = m.lever_tensors["read"].shape[0]
            assert m.lever_tensors["bank"].shape[-1] == d, k
            assert m.lever_tensors["g_inv_half"].shape == (d, d), k
    assert outcomes["error"] > 100, outcomes
    assert outcomes["loaded"] > 5, outcomes


def test_lever_config_defaults_changes_and_round_trip(bmap, tmp_path):
    from memctl.lever_config import LeverConfig

    assert bmap.lever_config == LeverConfig()  # a map without lever settings: the defaults
    changed = bmap.with_lever(positive_gain=0.0, pull_max=2.0, knob_scale=0.5)
    assert changed.lever_config.pull_max == 2.0
    assert changed.lever_config.knob_scale == 0.5
    assert changed.meta["probes"] == 3  # the probe's summary is kept
    assert bmap.lever_config == LeverConfig()  # the original is unchanged
    changed.save(tmp_path / "m.safetensors")
    assert BlockMap.load(tmp_path / "m.safetensors").lever_config == changed.lever_config
    with pytest.raises(ValueError, match="Expected lever settings among"):
        bmap.with_lever(pull_maks=2.0)


def test_shipped_map_files_load_their_lever_settings():
    from memctl.zoo import load_testbed

    config = load_testbed("digits").block_map().lever_config
    assert config.pull_max == 2.0  # as the shipped file's meta says
    assert config.positive_gain == 0.0
    assert config.fidelity_guidance > 0


def test_bad_lever_settings_are_refused(unet):
    scores = {b.name: 1.0 for b in find_blocks(unet)}
    with pytest.raises(ValueError, match="Expected pull_max to be a finite number >= 0, but got -1.0"):
        BlockMap.from_scores(unet, scores, meta={"pull_max": -1.0})
    with pytest.raises(ValueError, match="Expected fidelity_mode in"):
        BlockMap.from_scores(unet, scores, meta={"fidelity_mode": "pass"})


def test_with_lever_fixes_a_bad_setting_and_none_restores_the_default(bmap):
    broken = bmap.with_lever(pull_max=2.0)
    broken.meta["pull_max"] = -1.0  # meta edited by hand after construction
    with pytest.raises(ValueError, match="Expected pull_max to be a finite number >= 0"):
        _ = broken.lever_config
    fixed = broken.with_lever(pull_max=3.0)
    assert fixed.lever_config.pull_max == 3.0
    assert fixed.with_lever(pull_max=None).lever_config.pull_max == 1.0
