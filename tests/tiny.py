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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
