"""memctl.bake: the knob written into weights; close to the hooked knob, loads without memctl, fails cleanly."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import memctl
from memctl.bake import BAKE_KEY, bake, condition_edit
from memctl.blockmap import BlockMap
from memctl.blocks import find_blocks
from memctl.knob import apply_knob, remove_knob, set_fidelity
from tests.tiny import PIPELINE_FAMILIES, build, denoisers, prompt_mapped, sample, tiny_pipeline

LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)


@pytest.fixture(scope="module")
def digits():
    tb = memctl.zoo.load_testbed("digits")
    return tb, tb.pipeline(), tb.block_map()


def _outputs(pipe, prompts, seed=0):
    """The denoiser's outputs for `prompts` at each of LEVELS from seeded noise: `(levels, B, C, H, W)`."""
    cond, gen, res = pipe.encode_prompt(prompts), torch.Generator().manual_seed(seed), []
    n, cfg = pipe.scheduler.config.num_train_timesteps, pipe.unet.config
    for level in LEVELS:
        x = torch.randn(len(prompts), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
        with torch.no_grad():
            t = torch.full((len(prompts),), int(level * (n - 1)))
            res.append(pipe.unet(x, t, encoder_hidden_states=cond).sample)
    return torch.stack(res)


def _hooked(pipe, bmap, f, prompts):
    apply_knob(pipe, bmap)
    set_fidelity(pipe, f)
    try:
        return _outputs(pipe, prompts)
    finally:
        remove_knob(pipe)


def test_baked_digits_recovers_the_knob(digits):
    """Measured (this test's numbers): mean |baked − hooked| over the knob's change |hooked − plain| on the canary
    prompts at fidelity −1 was 0.06 fit on all canaries, 0.38 on the half of the canaries not fit on, 0.54 with
    the map's stand-ins (no prompts); the baked change on ordinary prompts was 0.05 of the canaries' change."""
    tb, pipe, bmap = digits
    canaries = [c[0] for c in tb.canaries]
    ordinary = [tb.prompt(c) for c in range(len(tb.classes))]
    plain, hooked = _outputs(pipe, canaries), _hooked(pipe, bmap, -1.0, canaries)
    change = (hooked - plain).abs().mean()
    assert change > 0.05  # the knob does change the canaries

    def rel(baked, which=slice(None)):
        return float((_outputs(baked, canaries)[:, which] - hooked[:, which]).abs().mean()
                     / (hooked[:, which] - plain[:, which]).abs().mean())  # fmt: skip

    assert rel(bake(pipe, bmap, -1.0, prompts=canaries)) < 0.15
    assert rel(bake(pipe, bmap, -1.0, prompts=canaries[::2]), slice(1, None, 2)) < 0.5  # held-out canaries
    assert rel(bake(pipe, bmap, -1.0)) < 0.65  # stand-ins only: weaker, still most of the change
    baked = bake(pipe, bmap, -1.0, prompts=canaries)
    assert (_outputs(baked, ordinary) - _outputs(pipe, ordinary)).abs().mean() < 0.1 * change
    assert torch.equal(_outputs(bake(pipe, bmap, 0.0), canaries), plain)  # fidelity 0: the same weights
    assert memctl.list_hooks(baked.unet) == []
    assert memctl.list_hooks(pipe.unet) == []
    assert baked.text_encoder is pipe.text_encoder
    assert baked.unet is not pipe.unet


def test_condition_edit_is_the_identity_without_a_pull(digits):
    _, _, bmap = digits
    m = condition_edit(bmap.lever_tensors, 0.0)
    assert torch.allclose(m, torch.eye(m.shape[0], dtype=m.dtype), atol=1e-10)
    assert not torch.allclose(condition_edit(bmap.lever_tensors, 1.0), m, atol=1e-3)


def test_baked_digits_folder_loads(digits, tmp_path):
    from diffusers import DiffusionPipeline

    tb, pipe, bmap = digits
    baked = bake(pipe, bmap, -0.5, tmp_path / "out", prompts=[c[0] for c in tb.canaries])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "bake.json", "denoiser.safetensors", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet"
    ]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    info = json.loads((out / "bake.json").read_text())
    assert json.loads((out / "unet" / "config.json").read_text())[BAKE_KEY] == info
    assert info["fidelity"] == -0.5
    assert info["source_fingerprint"] == memctl.fingerprint(pipe.unet)
    assert info["map_fingerprint"] == bmap.fingerprint
    assert info["baked_fingerprint"] != info["source_fingerprint"]
    prompts = [tb.canaries[0][0], "a seven"]
    again = memctl.load_pipeline(out)
    assert memctl.fingerprint(again.unet) == info["baked_fingerprint"]
    assert torch.equal(_outputs(again, prompts), _outputs(baked, prompts))
    custom = DiffusionPipeline.from_pretrained(out, custom_pipeline=memctl.pipeline_file("digits"),
                                               trust_remote_code=True)  # fmt: skip
    assert torch.equal(_outputs(custom, prompts), _outputs(baked, prompts))
    with pytest.raises(ValueError, match="different model"):
        bmap.check_model(again.unet)  # the source's map does not describe the baked weights
    # plain diffusers, no memctl: the denoiser folder and the single file load and compute the same
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = baked.encode_prompt(prompts)
    with torch.no_grad():
        expected = baked.unet(x, 300, encoder_hidden_states=cond).sample
    torch.save({"x": x, "cond": cond, "expected": expected}, tmp_path / "io.pt")
    code = f"""
import sys, torch
torch.set_num_threads(1)  # as in the parent: a different thread count may reorder float sums
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
io = torch.load({str(tmp_path / "io.pt")!r})
unet = UNet2DConditionModel.from_pretrained({str(out / "unet")!r})
with torch.no_grad():
    a = unet(io["x"], 300, encoder_hidden_states=io["cond"]).sample
    unet.load_state_dict(load_file({str(out / "denoiser.safetensors")!r}))
    b = unet(io["x"], 300, encoder_hidden_states=io["cond"]).sample
assert torch.equal(a, io["expected"]) and torch.equal(b, io["expected"]), "outputs differ"
assert not [m for m in sys.modules if m.split(".")[0] == "memctl"], "memctl was imported"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def _condition_map(pipe):
    """A prompt-only condition map of a tiny pipeline: tag-like prompts memorized, plain ones general."""
    from memctl.probe import condition_tensors, text_states
    from memctl.probeset import ProbeSet

    probes = ProbeSet(memorized=[(p, None) for p in ("zqx", "qzx", "xqz")],
                      general=[(p, None) for p in ("ab", "ba", "abc", "cab", "bca")])  # fmt: skip
    tensors, _ = condition_tensors(pipe, probes, k=2, encode=text_states)
    unet = pipe.unet
    bmap = BlockMap.from_scores(unet, {b.name: 1.0 for b in find_blocks(unet) if b.kind == "attention"},
                                method="prompt", meta={"pull_max": 2.0, "knob_scale": 1.0})  # fmt: skip
    bmap.lever, bmap.lever_tensors = "condition", tensors
    bmap.__post_init__()
    return bmap


_LOAD = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)
pipe.set_progress_bar_config(disable=True)
kwargs = torch.load(sys.argv[2])
out = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0))
torch.save(torch.as_tensor(getattr(out, sys.argv[4])), sys.argv[3])
assert type(pipe).__module__.startswith("diffusers."), type(pipe)
assert not [m for m in sys.modules if m.split(".")[0] == "memctl"], "memctl was imported"
"""


@pytest.mark.parametrize("family", ["sd", "sdxl", "animatediff", "wan"])
def test_tiny_cross_attention_families_bake_into_stock_folders(family, tmp_path):
    """Every tiny family whose denoiser cross-attends to the prompt (UNets, Wan's attn2): a condition map baked at
    -1 changes the samples, and the folder loads and samples with plain diffusers, in a process that never imports
    memctl."""
    if family == "wan":  # Wan's map: probed on its projected text states (memorized "ab")
        pipe, bmap = prompt_mapped("wan")
        prompt, memorized = "ab", ["ab"]
    else:
        pipe, prompt, memorized = tiny_pipeline(family), "zqx ab", ["zqx", "qzx", "xqz"]
        bmap = _condition_map(pipe)
    fam = PIPELINE_FAMILIES[family]
    call = {**fam.call, "prompt": prompt}
    plain = sample(pipe, family, prompt=call["prompt"])
    baked = bake(pipe, bmap, -1.0, tmp_path / "out", prompts=memorized)
    edited = [m for e in baked._memctl_bake["edits"] for m in e["modules"]]
    assert edited and all(m.endswith("attn2") for m in edited)  # the cross-attentions only
    assert type(baked) is type(pipe)
    ours = sample(baked, family, prompt=call["prompt"])
    assert not torch.equal(ours, plain)
    torch.save(call, tmp_path / "call.pt")
    args = [str(tmp_path / "out"), str(tmp_path / "call.pt"), str(tmp_path / "res.pt"), fam.output]
    proc = subprocess.run([sys.executable, "-c", _LOAD, *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "res.pt"), ours, atol=1e-5)


def test_residual_map_folds_exactly():
    """A residual map of UNet units (branches ending in conv2 / proj_out): the baked weights compute what the
    hooked knob does, up to float rounding, at one noise level."""
    pipe = tiny_pipeline("sd")
    unet = pipe.unet
    blocks = find_blocks(unet)
    scores = torch.randn(len(blocks), generator=torch.Generator().manual_seed(0))
    bmap = BlockMap.from_scores(unet, {b.name: float(s) for b, s in zip(blocks, scores, strict=True)})
    inputs = build("sd")[1]
    apply_knob(unet, bmap)
    set_fidelity(unet, -0.7)
    with torch.no_grad():
        hooked = unet(**inputs).sample
    remove_knob(unet)
    with torch.no_grad():
        plain, baked = unet(**inputs).sample, bake(pipe, bmap, -0.7).unet(**inputs).sample
    assert not torch.allclose(hooked, plain, atol=1e-3)
    assert torch.allclose(baked, hooked, atol=1e-5)
    with pytest.raises(ValueError, match="only for a condition-lever map"):
        bake(pipe, bmap, -0.7, prompts=["ab"])


def test_bad_input_is_a_clear_error_and_leaves_nothing(digits, tmp_path):
    tb, pipe, bmap = digits
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"fidelity > 0 is memorization guidance"):
        bake(pipe, bmap, 0.5, out)
    for bad in (-1.5, float("nan"), True, "x"):
        with pytest.raises(ValueError, match=r"Expected a fidelity in \[-1, 0\]"):
            bake(pipe, bmap, bad, out)
    other = memctl.zoo.load_testbed("digits-s1").block_map()
    with pytest.raises(ValueError, match="different model"):
        bake(pipe, other, -1.0, out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ValueError, match="new or empty folder"):
        bake(pipe, bmap, -1.0, tmp_path / "full")
    apply_knob(pipe, bmap)
    try:
        with pytest.raises(ValueError, match="remove_knob"):
            bake(pipe, bmap, -1.0, out)
    finally:
        remove_knob(pipe)
    with pytest.raises(ValueError, match="Expected a pipeline, but got the module .*: pass the pipeline"):
        bake(pipe.unet, bmap, -1.0, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_an_error_while_writing_leaves_nothing(digits, tmp_path, monkeypatch):
    from memctl.pipeline import PixelPipeline

    tb, pipe, bmap = digits

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PixelPipeline, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        bake(pipe, bmap, -1.0, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_transformer_residual_maps_are_not_bakeable():
    model, _ = build("dit")
    blocks = find_blocks(model)
    bmap = BlockMap.from_scores(model, {blocks[0].name: 1.0}, component="transformer")
    with pytest.raises(ValueError, match="cannot be folded into weights exactly"):
        bake(SimpleNamespace(transformer=model), bmap, -1.0)
    assert denoisers(SimpleNamespace(transformer=model))  # untouched module still there


def test_docstring_examples(digits, tmp_path):
    import doctest
    import importlib

    from tests.tiny import doc_globs

    module = importlib.import_module("memctl.bake")  # `memctl.bake` is the function
    globs = {**doc_globs(tmp_path), "memctl": memctl, "out_dir": tmp_path / "baked", "condition_map": digits[2]}
    result = doctest.testmod(module, extraglobs=globs)
    assert result.failed == 0
    assert result.attempted >= 4


def test_cli_bakes_a_testbed(tmp_path, capsys):
    from memctl import cli

    out = tmp_path / "out"
    assert cli.main(["bake", "digits", "--map", "testbed", "--fidelity", "-1", "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fidelity"] == -1.0
    assert info["memorized_states"].endswith("prompts")
    assert info["edits"]
    assert json.loads((out / "bake.json").read_text()) == info
    assert cli.main(["bake", "digits", "--map", "testbed", "--fidelity", "-1", "-o", str(out)]) == 2
    assert "Expected -o to be a new or empty folder" in capsys.readouterr().err
    assert cli.main(["bake", "digits", "--map", "testbed", "--fidelity", "0.5", "-o", str(tmp_path / "x")]) == 2
    assert "fidelity > 0 is memorization guidance" in capsys.readouterr().err
    assert cli.main(["bake", "digits", "--map", str(tmp_path / "no.safetensors"), "--fidelity", "-1",
                     "-o", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "Expected a block map file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_effect_bench_baked_row_swaps_the_baked_denoiser_in_and_back(digits):
    from memctl.effect import bake_setup

    tb, pipe, bmap = digits
    prompts = [c[0] for c in tb.canaries]
    original = pipe.unet
    plain = _outputs(pipe, prompts[:2])
    with bake_setup(pipe, bmap, -1.0, prompts)():
        assert pipe.unet is not original
        assert memctl.list_hooks(pipe.unet) == []
        baked = _outputs(pipe, prompts[:2])
    assert pipe.unet is original
    assert not torch.equal(baked, plain)
    assert torch.equal(_outputs(pipe, prompts[:2]), plain)
    assert torch.equal(baked, _outputs(bake(pipe, bmap, -1.0, prompts=prompts), prompts[:2]))


@pytest.mark.parametrize("family", ["sd3", "cogvideox"])
def test_joint_attention_condition_maps_are_refused_clearly(family):
    pipe, bmap = prompt_mapped(family)
    assert bmap.lever == "condition"
    with pytest.raises(ValueError, match="is a joint-attention block"):
        bake(pipe, bmap, -1.0)
