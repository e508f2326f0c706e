"""Tiny, seeded denoisers of every family memctl supports, for tests.

    >>> from tests.tiny import FAMILIES, build
    >>> model, inputs = build("unet2d")
    >>> out = model(**inputs, return_dict=False)[0]

Each builder makes a model from a small config under a fixed seed in well under 0.1 s, and `inputs` returns
seeded forward keyword arguments whose `timestep` is in the units the family's pipelines pass (0–1000 for most,
0–1 for Flux, whose pipelines divide by 1000). Zero-initialised output layers are re-initialised with small
random weights so that scaling any block visibly changes the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def _reinit_zeros(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give parameters that start at exactly zero (zero-init output layers) small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def _unet2d():
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    )  # fmt: skip

    def inputs(gen):
        return {"sample": _randn(gen, 2, 1, 8, 8), "timestep": torch.tensor(500)}

    return model, inputs


def _unet_cond(sdxl: bool):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:  # SDXL-like: linear projections, several transformer layers, added text/time conditioning
        extra = dict(
            use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 8,
        )  # fmt: skip
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") if sdxl else ("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if sdxl else ("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4, **extra,
    )  # fmt: skip

    def inputs(gen):
        kw = {
            "sample": _randn(gen, 2, 4, 8, 8),
            "timestep": torch.tensor(500),
            "encoder_hidden_states": _randn(gen, 2, 3, 8),
        }
        if sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": _randn(gen, 2, 8), "time_ids": _randn(gen, 2, 6)}
        return kw

    return model, inputs


def _unet_motion():
    from diffusers import UNetMotionModel

    model = UNetMotionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        num_attention_heads=2, in_channels=4, out_channels=4, motion_max_seq_length=4,
        motion_num_attention_heads=2,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
    )  # fmt: skip
    _reinit_zeros(model)

    def inputs(gen):
        return {
            "sample": _randn(gen, 1, 4, 2, 8, 8),  # (B, C, F, H, W)
            "timestep": torch.tensor(500),
            "encoder_hidden_states": _randn(gen, 2, 3, 8),  # (B * F, L, D): AnimateDiff repeats per frame
        }

    return model, inputs


def _unet3d():
    from diffusers import UNet3DConditionModel

    model = UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
    )  # fmt: skip
    _reinit_zeros(model)  # temp_convs end in a zero-initialised conv

    def inputs(gen):
        return {
            "sample": _randn(gen, 1, 4, 2, 8, 8),
            "timestep": torch.tensor(500),
            "encoder_hidden_states": _randn(gen, 1, 3, 8),
        }

    return model, inputs


def _dit():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
    )  # fmt: skip
    _reinit_zeros(model)

    def inputs(gen):
        x = _randn(gen, 2, 4, 8, 8)
        return {"hidden_states": x, "timestep": torch.tensor([500, 500]), "class_labels": torch.tensor([1, 2])}

    return model, inputs


def _pixart():
    from diffusers import Transformer2DModel

    model = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=8, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, caption_channels=12, num_embeds_ada_norm=1000,
    )  # fmt: skip
    _reinit_zeros(model)

    def inputs(gen):
        return {
            "hidden_states": _randn(gen, 2, 4, 8, 8),
            "timestep": torch.tensor([500, 500]),
            "encoder_hidden_states": _randn(gen, 2, 3, 12),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    return model, inputs


def _sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8, pooled_projection_dim=6,
        pos_embed_max_size=16,
    )  # fmt: skip
    _reinit_zeros(model)

    def inputs(gen):
        return {
            "hidden_states": _randn(gen, 2, 4, 8, 8),
            "encoder_hidden_states": _randn(gen, 2, 3, 8),
            "pooled_projections": _randn(gen, 2, 6),
            "timestep": torch.tensor([500.0, 500.0]),
        }

    return model, inputs


def _flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=6, axes_dims_rope=(0, 2, 2),
    )  # fmt: skip
    _reinit_zeros(model)

    def inputs(gen):
        grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
        return {
            "hidden_states": _randn(gen, 1, 16, 4),  # (B, tokens, C): packed latents
            "encoder_hidden_states": _randn(gen, 1, 3, 8),
            "pooled_projections": _randn(gen, 1, 6),
            "timestep": torch.tensor([0.5]),  # Flux pipelines pass t / 1000
            "img_ids": torch.stack(grid, -1).reshape(16, 3),
            "txt_ids": torch.zeros(3, 3),
        }  # fmt: skip

    return model, inputs


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=3,
    )  # fmt: skip
    _reinit_zeros(model)

    def inputs(gen):
        return {
            "hidden_states": _randn(gen, 1, 3, 4, 8, 8),  # (B, F, C, H, W)
            "encoder_hidden_states": _randn(gen, 1, 3, 8),
            "timestep": torch.tensor([500]),
        }

    return model, inputs


def _wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    _reinit_zeros(model)

    def inputs(gen):
        return {
            "hidden_states": _randn(gen, 1, 4, 2, 8, 8),  # (B, C, F, H, W)
            "encoder_hidden_states": _randn(gen, 1, 3, 8),
            "timestep": torch.tensor([500]),
        }

    return model, inputs


@dataclass(frozen=True)
class Family:
    name: str
    builder: Callable[[], tuple[torch.nn.Module, Callable[[torch.Generator], dict[str, Any]]]]
    component: str  # the pipeline attribute this denoiser lives under


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("unet2d", _unet2d, "unet"),
        Family("sd", lambda: _unet_cond(sdxl=False), "unet"),
        Family("sdxl", lambda: _unet_cond(sdxl=True), "unet"),
        Family("motion", _unet_motion, "unet"),
        Family("unet3d", _unet3d, "unet"),
        Family("dit", _dit, "transformer"),
        Family("pixart", _pixart, "transformer"),
        Family("sd3", _sd3, "transformer"),
        Family("flux", _flux, "transformer"),
        Family("cogvideox", _cogvideox, "transformer"),
        Family("wan", _wan, "transformer"),
    ]
}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build family `name` under `seed` (eval mode) and seeded inputs for one forward."""
    torch.manual_seed(seed)
    model, inputs = FAMILIES[name].builder()
    return model.eval(), inputs(torch.Generator().manual_seed(seed + 100))


def run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """One forward, returning the denoiser's output tensor."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def tiny_tokenizer(max_length: int = 8):
    """A byte-level CLIP tokenizer built in memory (empty merges): every character is a token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_sd_pipeline(seed: int = 0):
    """A StableDiffusionPipeline from tiny configs, offline: 8×8 images, 4 latent channels, 1-layer CLIP."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8, bos_token_id=len(tokenizer) - 2,
                       eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    ).eval()  # fmt: skip
    unet, _ = _unet_cond(sdxl=False)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))  # fmt: skip
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def doc_globs(tmp_path) -> dict[str, Any]:
    """The names the docstring examples of memctl.hooks, memctl.blockmap and memctl.knob use."""
    from memctl.blockmap import BlockMap
    from memctl.blocks import find_blocks

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    unet, inputs = build("sd")
    bmap = BlockMap.from_scores(pipe.unet, {"mid_block": 1.0, "up_blocks.0": -0.5})
    x, t, c = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
    path = str(tmp_path / "map.safetensors")
    return dict(pipe=pipe, bmap=bmap, unet=unet, inputs=inputs, x=x, t=t, c=c, path=path, find_blocks=find_blocks)


# --- tiny pipelines of every family, offline (for the family, custom-pipeline, video and composition tests) ---------


def _clip(hidden: int, projection: int | None = None):
    """A 1-layer CLIP text encoder over `tiny_tokenizer()`; with `projection`, `CLIPTextModelWithProjection`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    n = len(tiny_tokenizer())
    config = CLIPTextConfig(vocab_size=n, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8, bos_token_id=n - 2, eos_token_id=n - 1,
                            pad_token_id=n - 1, projection_dim=projection or hidden)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(latent_channels: int = 4, **kwargs):
    """An image VAE that keeps the size (one block: scale factor 1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,),
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), **kwargs).eval()  # fmt: skip


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer built in memory from a vocab list: lower-case letters, digits and a few signs."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 ,."
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("▁" + c, -1.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5(cls_name: str = "T5EncoderModel"):
    import transformers

    config_cls = transformers.UMT5Config if cls_name.startswith("UMT5") else transformers.T5Config
    config = config_cls(vocab_size=len(tiny_t5_tokenizer()), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    return getattr(transformers, cls_name)(config).eval()


def _sdxl_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    unet, _ = _unet_cond(sdxl=True)  # cross_attention_dim 8 = 4 + 4 (both encoders); pooled 8
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip(4), text_encoder_2=_clip(4, projection=8), tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(), unet=unet.eval(),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    )  # fmt: skip


def _sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer, _ = _sd3()  # joint_attention_dim 8 = 4 + 4 (CLIPs, no T5); pooled 6 = 3 + 3
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0),
        text_encoder=_clip(4, projection=3), tokenizer=tiny_tokenizer(), text_encoder_2=_clip(4, projection=3),
        tokenizer_2=tiny_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


def _flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer, _ = _flux()  # 4 packed channels = 1 latent channel × 2 × 2; joint 8 (T5), pooled 6 (CLIP)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1, shift_factor=0.0), text_encoder=_clip(6),
        tokenizer=tiny_tokenizer(), text_encoder_2=_t5(), tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer.eval(),
    )  # fmt: skip


def _dit_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4,
    )  # fmt: skip  # 1000 classes: DiTPipeline's null class is 1000
    _reinit_zeros(transformer)
    return DiTPipeline(transformer=transformer.eval(), vae=_vae(), scheduler=DDIMScheduler(),
                       id2label={0: "zero", 1: "one"})  # fmt: skip


def _animatediff_pipeline():
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    unet, _ = _unet_motion()
    return AnimateDiffPipeline(
        vae=_vae(), text_encoder=_clip(8), tokenizer=tiny_tokenizer(), unet=unet.eval(), motion_adapter=None,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1, beta_schedule="linear"),
    )  # fmt: skip


def _cogvideox_pipeline():
    import diffusers as d

    transformer = d.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    )  # fmt: skip  # 8 text tokens: call with max_sequence_length=8
    _reinit_zeros(transformer)
    vae = d.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )  # fmt: skip  # 9 frames of 32×32 <-> 3 latent frames of 8×8
    return d.CogVideoXPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=_t5(), vae=vae.eval(),
                               transformer=transformer.eval(), scheduler=d.CogVideoXDDIMScheduler())  # fmt: skip


def _wan_transformer():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    return _reinit_zeros(model).eval()


def _wan_pipeline(experts: int = 1):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4)  # fmt: skip  # 5 frames of 16×16 <-> 2 latent frames of 2×2
    two = {"transformer_2": _wan_transformer(), "boundary_ratio": 0.5} if experts == 2 else {}
    return WanPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=_t5("UMT5EncoderModel"), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=_wan_transformer(),
                       **two)  # fmt: skip


@dataclass(frozen=True)
class PipelineFamily:
    """A tiny pipeline of one family and a small call of it (two steps, guidance on)."""

    name: str
    builder: Callable[[], Any]
    call: dict[str, Any]  # keyword arguments; a seeded generator is added by `sample`
    custom: str  # memctl.pipeline_file name of its custom pipeline
    guidance: str  # how the guidance passes run: "batch" (one call), "calls" (two calls), "labels" (DiT)
    output: str = "images"  # or "frames"
    load: dict[str, Any] = field(default_factory=dict)  # from_pretrained keywords (components saved as None)


_IMAGE = {"prompt": "ab", "num_inference_steps": 2, "height": 8, "width": 8, "guidance_scale": 5.0}
_FLUX = {**_IMAGE, "guidance_scale": 3.5, "negative_prompt": "c", "true_cfg_scale": 2.0, "max_sequence_length": 8}
_DIT = {"class_labels": [1], "num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "np"}
_VIDEO = {**_IMAGE, "guidance_scale": 2.0, "max_sequence_length": 8}
_COGVIDEOX = {**_VIDEO, "num_frames": 9, "height": 32, "width": 32}
_WAN = {**_VIDEO, "num_frames": 5, "height": 16, "width": 16}
_ANIMATEDIFF = {**_IMAGE, "num_frames": 3}
_NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}  # SD3 without T5: saved as None, passed again when loading
PIPELINE_FAMILIES: dict[str, PipelineFamily] = {
    p.name: p
    for p in [
        PipelineFamily("sd", lambda: tiny_sd_pipeline(), _IMAGE, "sd", "batch"),
        PipelineFamily("sdxl", _sdxl_pipeline, _IMAGE, "sdxl", "batch"),
        PipelineFamily("sd3", _sd3_pipeline, _IMAGE, "sd3", "batch", load=_NO_T5),
        PipelineFamily("flux", _flux_pipeline, _FLUX, "flux", "calls"),
        PipelineFamily("dit", _dit_pipeline, _DIT, "dit", "labels"),
        PipelineFamily("animatediff", _animatediff_pipeline, _ANIMATEDIFF, "animatediff", "batch", "frames"),
        PipelineFamily("cogvideox", _cogvideox_pipeline, _COGVIDEOX, "cogvideox", "batch", "frames"),
        PipelineFamily("wan", _wan_pipeline, _WAN, "wan", "calls", "frames"),
        PipelineFamily("wan22", lambda: _wan_pipeline(experts=2), _WAN, "wan", "calls", "frames"),
    ]
}


def tiny_pipeline(name: str, seed: int = 0):
    """The tiny pipeline of family `name` (see `PIPELINE_FAMILIES`), built under `seed`, progress bars off."""
    torch.manual_seed(seed)
    pipe = PIPELINE_FAMILIES[name].builder()
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPT_CALL_KEYS = ("num_frames", "height", "width", "max_sequence_length", "negative_prompt", "true_cfg_scale")


def prompt_mapped(name: str, general=("ba", "aa"), keys=PROMPT_CALL_KEYS):
    """`(pipe, bmap)`: the tiny pipeline of `name` with larger seeded transformer weights (the tiny ones barely react
    to the text) and its prompt-only map from memorized "ab" and `general`, probed with the family call's `keys`."""
    import memctl

    family = PIPELINE_FAMILIES[name]
    pipe = tiny_pipeline(name)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    call = {k: v for k, v in family.call.items() if k in keys}
    probes = memctl.ProbeSet(memorized=[("ab", None)], general=[(g, None) for g in general])
    return pipe, memctl.probe(pipe, probes, method="prompt", call_kwargs=call, progress=False)


def sample(pipe, name: str, seed: int = 0, **overrides) -> torch.Tensor:
    """The family's small call on `pipe` with a seeded generator, as a float tensor (images or frames)."""
    family = PIPELINE_FAMILIES[name]
    kwargs = {"output_type": "pt", **family.call, **overrides, "generator": torch.Generator().manual_seed(seed)}
    out = pipe(**kwargs)
    return torch.as_tensor(np.asarray(getattr(out, family.output)) if kwargs["output_type"] == "np" else
                           getattr(out, family.output))  # fmt: skip


def denoisers(pipe) -> dict[str, torch.nn.Module]:
    """{component: denoiser} of a pipeline (unet, transformer, transformer_2)."""
    names = ("unet", "transformer", "transformer_2")
    return {c: getattr(pipe, c) for c in names if isinstance(getattr(pipe, c, None), torch.nn.Module)}


def full_map(pipe, seed: int = 0):
    """A map covering every unit of every denoiser of `pipe`, seeded scores of both signs (combined for experts)."""
    from memctl.blockmap import BlockMap
    from memctl.blocks import find_blocks

    maps = []
    for i, (component, model) in enumerate(denoisers(pipe).items()):
        blocks = find_blocks(model)
        scores = torch.randn(len(blocks), generator=torch.Generator().manual_seed(seed + i))
        table = {b.name: float(s) for b, s in zip(blocks, scores, strict=True)}
        maps.append(BlockMap.from_scores(model, table, component=component))
    return maps[0] if len(maps) == 1 else BlockMap.combine(*maps)


@contextmanager
def denoiser_outputs(pipe) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Record (component, output) of every denoiser call inside the `with` block (a torch forward hook)."""
    store: list[tuple[str, torch.Tensor]] = []
    handles = [
        model.register_forward_hook(lambda m, a, out, c=c: store.append((c, out[0].detach().clone())))
        for c, model in denoisers(pipe).items()
    ]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def wan22_prompt_mapped():
    """`(pipe, bmap)`: the tiny Wan 2.2 pipeline with the two experts' text projections made to differ (as in the
    released weights) and its prompt-only map from memorized "ab" and general "ba", "aa"."""
    import memctl

    pipe = tiny_pipeline("wan22")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for p in pipe.transformer_2.condition_embedder.text_embedder.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    call = {k: v for k, v in PIPELINE_FAMILIES["wan22"].call.items() if k in ("num_frames", "height", "width")}
    probes = memctl.ProbeSet(memorized=[("ab", None)], general=[("ba", None), ("aa", None)])
    return pipe, memctl.probe(pipe, probes, method="prompt", progress=False, call_kwargs=call)
