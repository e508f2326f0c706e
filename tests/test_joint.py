"""The condition lever on joint-attention transformers (SD3, Flux double and single stream, CogVideoX): a prompt map
fits lever tensors per block on that block's own text-stream input, is exact at 0, acts at -1, saves and loads."""

import pytest
import torch
from tiny import PIPELINE_FAMILIES, PROMPT_CALL_KEYS, prompt_mapped

import memctl
from memctl.blocks import find_blocks
from memctl.joint import JOINT_BLOCKS, joint_paths, text_stream_states

FAMILIES = ["sd3", "flux", "cogvideox"]


def _setup(name):
    torch.set_num_threads(1)
    family = PIPELINE_FAMILIES[name]
    pipe, bmap = prompt_mapped(name, general=("ba", "aa b"))

    def run():
        out = pipe(**family.call, generator=torch.Generator().manual_seed(0), output_type="pt")
        return out.frames if hasattr(out, "frames") else out.images

    return pipe, bmap, run


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_map_uses_the_condition_lever_per_block(name, tmp_path):
    pipe, bmap, run = _setup(name)
    assert bmap.lever == "condition"
    paths = [p for b in find_blocks(pipe.transformer) for p in joint_paths(pipe.transformer, b)]
    kinds = {type(pipe.transformer.get_submodule(p)).__name__ for p in paths}
    assert kinds <= set(JOINT_BLOCKS) and (name != "flux" or len(kinds) == 2)  # Flux: double and single stream
    for p in paths:  # each block's own subspace, fitted on its own inputs
        assert bmap.lever_tensors[f"read@{p}"].shape[0] == bmap.lever_tensors[f"bank@{p}"].shape[-1]
    assert not torch.equal(bmap.lever_tensors[f"bank@{paths[0]}"], bmap.lever_tensors[f"bank@{paths[-1]}"])
    assert (bmap.scores != 0).all()  # every unit probed with its lever

    plain = run()
    memctl.apply_knob(pipe, bmap)
    with memctl.fidelity(pipe, 0.0):
        assert torch.equal(run(), plain)
    with memctl.fidelity(pipe, -1.0):
        pulled = run()
    assert not torch.equal(pulled, plain)
    memctl.remove_knob(pipe)
    assert memctl.list_hooks(pipe.transformer) == []

    bmap.save(tmp_path / "m.safetensors")  # per-block tensors survive the file
    memctl.apply_knob(pipe, memctl.BlockMap.load(tmp_path / "m.safetensors"))
    with memctl.fidelity(pipe, -1.0):
        assert torch.equal(run(), pulled)
    memctl.remove_knob(pipe)
    with pytest.raises(ValueError, match="passes='cond'"):  # the lever acts on the conditioning itself
        memctl.apply_knob(pipe, bmap, passes="cond")


def test_text_stream_states_differ_from_block_to_block():
    pipe, _, _ = _setup("sd3")
    call = {k: v for k, v in PIPELINE_FAMILIES["sd3"].call.items() if k in PROMPT_CALL_KEYS and k != "negative_prompt"}
    paths = [p for b in find_blocks(pipe.transformer) for p in joint_paths(pipe.transformer, b)]
    states = text_stream_states(pipe, pipe.transformer, paths, ["ab", "ba"], **call)
    first, second = (states[p] for p in paths[:2])
    assert first.shape[0] == 2 and first.shape == second.shape
    assert not torch.allclose(first, second)
    assert memctl.list_hooks(pipe.transformer) == []


def test_per_block_tensors_of_the_wrong_shape_are_refused():
    import dataclasses

    _, bmap, _ = _setup("cogvideox")
    key = next(k for k in bmap.lever_tensors if k.startswith("bank@"))
    bad = {**bmap.lever_tensors, key: bmap.lever_tensors[key][..., :-1]}
    with pytest.raises(ValueError, match=f"Expected tensor `lever.{key}` of shape \\(P, L, D="):
        dataclasses.replace(bmap, lever_tensors=bad)
    partial = {k: v for k, v in bmap.lever_tensors.items() if not k.startswith("tau@")}
    with pytest.raises(ValueError, match="Expected tensors lever.tau@"):
        dataclasses.replace(bmap, lever_tensors=partial)


@pytest.mark.parametrize("name", ["sd3", "cogvideox", "flux"])
def test_compiled_joint_lever_does_not_recompile_when_fidelity_changes(name):
    """One graph whatever the fidelity (Flux: its "cond" and "uncond" calls too)."""
    from torch._dynamo.utils import counters

    pipe, bmap, run = _setup(name)
    memctl.apply_knob(pipe, bmap)
    eager = {}
    for f in (0.0, -0.5, -1.0):
        memctl.set_fidelity(pipe, f)
        eager[f] = run()
    torch._dynamo.reset()
    counters.clear()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager", fullgraph=True)
    try:
        for f in (0.0, -0.5, -1.0, -0.5):
            memctl.set_fidelity(pipe, f)
            assert torch.allclose(run(), eager[f], atol=1e-6)
        assert counters["stats"]["unique_graphs"] == 1
        assert not torch.equal(eager[-1.0], eager[0.0])
    finally:
        memctl.remove_knob(pipe)
        torch._dynamo.reset()


def test_random_subspace_control_of_a_joint_map_is_refused():
    """Per-block subspaces keep no per-block whitening: a random-subspace control would silently keep them."""
    _, bmap = prompt_mapped("sd3")
    with pytest.raises(ValueError, match="a subspace per joint-attention block"):
        bmap.shuffled(seed=0)


def test_joint_banks_keep_the_denoisers_dtype():
    """A bfloat16 SD3's per-block banks, the bulk of a joint map, are stored in bfloat16 (half of float32; the knob
    casts a bank to the states' dtype anyway): the knob is exact at 0 and acts at -1."""
    torch.set_num_threads(1)
    family = PIPELINE_FAMILIES["sd3"]
    pipe, _ = prompt_mapped("sd3")
    pipe.to(dtype=torch.bfloat16)
    call = {k: v for k, v in family.call.items() if k in PROMPT_CALL_KEYS}
    probes = memctl.ProbeSet(memorized=[("ab", None)], general=[("ba", None), ("aa b", None)])
    bmap = memctl.probe(pipe, probes, method="prompt", call_kwargs=call, progress=False)
    banks = {k: v for k, v in bmap.lever_tensors.items() if k.startswith("bank")}
    assert banks and all(v.dtype == torch.bfloat16 for v in banks.values())
    assert bmap.lever_tensors["read"].dtype == torch.float32  # the subspace and threshold stay float32

    def run():
        return pipe(**family.call, generator=torch.Generator().manual_seed(0), output_type="pt").images

    plain = run()
    memctl.apply_knob(pipe, bmap)
    with memctl.fidelity(pipe, 0.0):
        assert torch.equal(run(), plain)
    with memctl.fidelity(pipe, -1.0):
        assert not torch.equal(run(), plain)
    memctl.remove_knob(pipe)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_trained_joint_toys_load_with_their_stock_pipeline_and_the_knob_acts(family):
    """The SD3 and Flux toys trained on digits-s0's data (`bench/joint_testbed.py`, weights in bench/results) load
    through their diffusers pipeline class and sample 16×16 pixels in [0, 1]; a prompt map of their joint blocks
    is exact at 0 and moves a canary's sample at -1."""
    import importlib.util
    from pathlib import Path

    torch.set_num_threads(1)
    path = Path(__file__).parents[1] / "bench" / "joint_testbed.py"
    spec = importlib.util.spec_from_file_location("joint_testbed", path)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    pipe = toy.load_pipeline(family)
    canary, general = "a two, tag hkb", ["a two", "a three", "the digit seven"]

    def run():
        gen = torch.Generator().manual_seed(10_000)
        return pipe([canary], num_inference_steps=4, guidance_scale=1.0, generator=gen, output_type="pt").images

    plain = run()
    assert plain.shape == (1, 1, 16, 16) and 0 <= float(plain.min()) and float(plain.max()) <= 1
    probes = memctl.ProbeSet(memorized=[(canary, None)], general=[(p, None) for p in general])
    bmap = memctl.probe(pipe, probes, method="prompt", call_kwargs=toy.PROBE_CALL[family], progress=False)
    assert bmap.lever == "condition" and len(bmap.names) == 4
    memctl.apply_knob(pipe, bmap)
    with memctl.fidelity(pipe, 0.0):
        assert torch.equal(run(), plain)
    with memctl.fidelity(pipe, -1.0):
        assert (run() - plain).abs().max() > 0.05
    memctl.remove_knob(pipe)
