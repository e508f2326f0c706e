"""The knob with what users stack on a pipeline: FreeU, PAG, attention processors, torch.compile, CPU offload."""

import pytest
import torch
from diffusers import AutoPipelineForText2Image
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch._dynamo.utils import counters

from memctl.knob import apply_knob, fidelity, get_knob, remove_knob, set_fidelity
from tests.tiny import denoiser_outputs, full_map, sample, tiny_pipeline

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (diffusers offloads to cuda)")


def test_freeu():
    pipe = tiny_pipeline("sd")
    ref = sample(pipe, "sd")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    freeu = sample(pipe, "sd")
    assert not torch.equal(freeu, ref)
    apply_knob(pipe, full_map(pipe))
    assert torch.equal(sample(pipe, "sd"), freeu)  # fidelity 0 on top of FreeU: FreeU alone
    with fidelity(pipe, -1.0):
        both = sample(pipe, "sd")
    assert not torch.equal(both, freeu)
    pipe.disable_freeu()
    with fidelity(pipe, -1.0):
        knob_only = sample(pipe, "sd")
    assert not torch.equal(knob_only, both)
    assert not torch.equal(knob_only, ref)
    remove_knob(pipe)
    assert torch.equal(sample(pipe, "sd"), ref)


@pytest.mark.parametrize(
    "guidance_scale, pag_scale, untouched",
    [(5.0, 3.0, [True, False, False]), (1.0, 3.0, [False, False]), (5.0, 0.0, [True, False])],
)  # batch [uncond, cond, perturbed], [cond, perturbed] without guidance, [uncond, cond] without PAG
def test_pag(guidance_scale, pag_scale, untouched):
    pipe = AutoPipelineForText2Image.from_pipe(tiny_pipeline("sd"), enable_pag=True, pag_applied_layers=["mid"])
    assert type(pipe).__name__ == "StableDiffusionPAGPipeline"
    kw = {"guidance_scale": guidance_scale, "pag_scale": pag_scale}
    with denoiser_outputs(pipe) as plain:
        ref = sample(pipe, "sd", **kw)
    apply_knob(pipe, full_map(pipe), passes="cond")
    assert torch.equal(sample(pipe, "sd", **kw), ref)
    with fidelity(pipe, -1.0), denoiser_outputs(pipe) as knobbed:
        assert not torch.equal(sample(pipe, "sd", **kw), ref)
    a, b = plain[0][1], knobbed[0][1]  # the first step's batch
    assert [torch.equal(x, y) for x, y in zip(a, b, strict=True)] == untouched
    remove_knob(pipe)


def test_attention_processors():
    """Classic and SDPA attention: exact at fidelity 0 with each, the same knob effect up to float rounding."""
    pipe = tiny_pipeline("sd")
    bmap = full_map(pipe)
    out = {}
    for processor in (AttnProcessor(), AttnProcessor2_0()):
        pipe.unet.set_attn_processor(processor)
        ref = sample(pipe, "sd")
        apply_knob(pipe, bmap)
        assert torch.equal(sample(pipe, "sd"), ref)
        with fidelity(pipe, -1.0):
            out[type(processor).__name__] = sample(pipe, "sd")
        assert not torch.equal(out[type(processor).__name__], ref)
        remove_knob(pipe)
    assert torch.allclose(out["AttnProcessor"], out["AttnProcessor2_0"], atol=1e-4)


@pytest.mark.parametrize("name, passes, graphs", [("sd", "both", 1), ("flux", "cond", 2)])
def test_compiled_denoiser_does_not_recompile_when_fidelity_changes(name, passes, graphs):
    """Flux's two calls ("cond", "uncond") make two graphs, compiled once each."""
    pipe = tiny_pipeline(name)
    component = "unet" if name == "sd" else "transformer"
    apply_knob(pipe, full_map(pipe), passes=passes)
    eager = {}
    for f in (0.0, 0.5, -0.7):
        set_fidelity(pipe, f)
        eager[f] = sample(pipe, name)
    torch._dynamo.reset()
    counters.clear()
    setattr(pipe, component, torch.compile(getattr(pipe, component), backend="eager", fullgraph=True))
    try:
        for f in (0.0, 0.5, -0.7):
            set_fidelity(pipe, f)
            assert torch.equal(sample(pipe, name), eager[f])
        assert counters["stats"]["unique_graphs"] == graphs
        assert not torch.equal(eager[0.5], eager[0.0])
    finally:
        remove_knob(pipe)
        torch._dynamo.reset()


def test_knob_after_sequential_offload_is_a_clear_error():
    pipe = tiny_pipeline("sd")
    pipe.enable_sequential_cpu_offload(device="cpu")  # weights go to the meta device until each forward
    with pytest.raises(ValueError, match="apply the knob before enabling sequential offload"):
        apply_knob(pipe, full_map(tiny_pipeline("sd")))
    assert get_knob(pipe) is None


@CUDA
@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_cpu_offload_on_gpu(offload):
    pipe = tiny_pipeline("sd")
    bmap = full_map(pipe)
    ref = sample(tiny_pipeline("sd").to("cuda"), "sd").cpu()
    apply_knob(pipe, bmap)  # before offloading: the weights must be in memory to check the map's fingerprint
    getattr(pipe, offload)()
    assert torch.allclose(sample(pipe, "sd").cpu(), ref, atol=1e-5)
    with fidelity(pipe, -1.0):
        assert not torch.allclose(sample(pipe, "sd").cpu(), ref, atol=1e-3)
    remove_knob(pipe)


@CUDA
def test_xformers_attention():
    pytest.importorskip("xformers")
    pipe = tiny_pipeline("sd").to("cuda")
    pipe.enable_xformers_memory_efficient_attention()
    ref = sample(pipe, "sd")
    apply_knob(pipe, full_map(pipe))
    assert torch.equal(sample(pipe, "sd"), ref)
    with fidelity(pipe, -1.0):
        assert not torch.equal(sample(pipe, "sd"), ref)
    remove_knob(pipe)
