"""The models, maps and inputs `memctl.speed` times: SD 1.5- and Wan 2.1 1.3B-sized denoisers from their configs
(random weights, no download), the knob's condition and residual maps of realistic shape, the baked UNet, FreeU and
PAG, and one denoiser call's inputs.

    >>> unet = build_unet(tiny=True)
    >>> condition_map(unet).lever, residual_map(unet).lever
    ('condition', 'residual')
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from memctl.blockmap import BlockMap
from memctl.blocks import find_blocks
from memctl.hooks import cross_attentions
from memctl.knob import apply_knob, remove_knob, set_fidelity

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json, the fields that differ from defaults)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
# Wan 2.1 T2V 1.3B's transformer (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json)
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6,
)  # fmt: skip
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32,
                 norm_num_groups=8, attention_head_dim=4)  # fmt: skip
TINY_WAN = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=64,
                num_layers=2)  # fmt: skip
FREEU_SD15 = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)  # the published SD 1.5 setting
NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
TEXT_TOKENS, N_GENERAL, N_MEMORIZED = 77, 60, 20
# Gains as memctl.probe would store them (their values do not change the cost)
META = {"positive_gain": 0.0, "fidelity_guidance": 0.5, "attention_guidance": 0.1, "pull_max": 2.0}
BAR_NONPOSITIVE, BAR_POSITIVE = 1.03, 1.10  # issue 13: fidelity <= 0 at most 1.03x plain, fidelity +1 at most 1.10x


def build_unet(tiny: bool = False, device="cpu", dtype=torch.float32, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)).to(dtype).eval()


def build_wan(tiny: bool = False, device="cpu", dtype=torch.float32, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        return WanTransformer3DModel(**(TINY_WAN if tiny else WAN_1_3B)).to(dtype).eval()


def _scores(n: int, gen: torch.Generator) -> torch.Tensor:
    """`(n, levels)` scores of both signs, like a probe's: about a third of the units memorization-heavy."""
    return torch.randn(n, len(NOISE_LEVELS), generator=gen) - 0.4


def _state_dim(model: torch.nn.Module) -> int:
    """Width of what the cross-attentions read: the UNet's text states, or Wan's projected ones (its inner dim)."""
    c = model.config
    return c.cross_attention_dim if "cross_attention_dim" in c else c.num_attention_heads * c.attention_head_dim


def _conditionings(d: int, gen: torch.Generator, tokens: int = TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """`(P, L, D)` general conditionings and `(M, L, D)` memorized ones (general ones with a shared tag)."""
    bank = torch.randn(N_GENERAL, tokens, d, generator=gen)
    memorized = bank[:N_MEMORIZED].clone()
    memorized[:, 5:9] += 3.0 * torch.randn(d, generator=gen)
    return bank, memorized


def condition_map(unet: torch.nn.Module, seed: int = 0, tokens: int = TEXT_TOKENS) -> BlockMap:
    """A condition-lever map of realistic shape: every cross-attention unit, a bank of 60 general conditionings of
    `tokens` tokens (77 for SD's CLIP; for Wan the call's text length, its states projected to the inner dim)."""
    from memctl.subspace import fit_subspace, weight_threshold

    gen = torch.Generator().manual_seed(seed)
    bank, memorized = _conditionings(_state_dim(unet), gen, tokens)
    sub = fit_subspace(memorized, bank, k=8)
    units = [b for b in find_blocks(unet) if cross_attentions(unet, b)]
    scores = _scores(len(units), gen)
    positive = scores[scores > 0]
    meta = {**META, "knob_scale": float(positive.median()) if len(positive) else 1.0}
    bmap = BlockMap.from_scores(unet, {b.name: s.tolist() for b, s in zip(units, scores, strict=True)},
                                levels=list(NOISE_LEVELS), method="condition", meta=meta)  # fmt: skip
    bmap.lever = "condition"
    bmap.lever_tensors = {"read": sub.read, "tau": weight_threshold(bank, sub.read), "bank": bank,
                          "g_inv_half": sub.g_inv_half}  # fmt: skip
    bmap.__post_init__()
    return bmap


def residual_map(model: torch.nn.Module, seed: int = 0) -> BlockMap:
    """A residual-lever map over every residual unit, per-level scores of both signs."""
    gen = torch.Generator().manual_seed(seed)
    blocks = find_blocks(model)
    scores = _scores(len(blocks), gen)
    return BlockMap.from_scores(model, {b.name: s.tolist() for b, s in zip(blocks, scores, strict=True)},
                                levels=list(NOISE_LEVELS), method="ablation")  # fmt: skip


def baked_unet(unet: torch.nn.Module, bmap: BlockMap, fidelity: float = -1.0, seed: int = 0) -> torch.nn.Module:
    """A hook-free copy with the knob at `fidelity` in its weights: the edit `memctl.bake` makes and saves, fit on
    the memorized conditionings of `condition_map(unet, seed)` (as `bake(..., prompts=...)` fits on prompts)."""
    from memctl.bake import _bake_denoiser

    tokens = bmap.lever_tensors["bank"].shape[1]  # Wan: the call's text length, at the inner dim
    memorized = _conditionings(_state_dim(unet), torch.Generator().manual_seed(seed), tokens)[1]
    baked = copy.deepcopy(unet)
    _bake_denoiser(baked, bmap.select(next(iter(bmap.fingerprints))), fidelity, 1.0, memorized, 1.0)
    return baked


# --- configurations: (name, setup, forward) --------------------------------------------------------------------


@contextmanager
def knob(model, bmap, f: float, mode: str | None = None) -> Iterator[None]:
    apply_knob(model, bmap, fidelity_mode=mode)
    set_fidelity(model, f)
    try:
        yield
    finally:
        remove_knob(model)


@contextmanager
def freeu(unet) -> Iterator[None]:
    unet.enable_freeu(**FREEU_SD15)
    try:
        yield
    finally:
        unet.disable_freeu()


@contextmanager
def pag(unet, layers: str = "mid") -> Iterator[None]:
    """diffusers' PAG processors on the UNet's `layers` self-attentions (StableDiffusionPAGPipeline's default)."""
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    class _Shim(PAGMixin):
        def __init__(self, unet):
            self.unet = unet

    before = unet.attn_processors
    shim = _Shim(unet)
    shim.set_pag_applied_layers(layers)
    shim._set_pag_attn_processor(shim.pag_applied_layers, do_classifier_free_guidance=True)
    try:
        yield
    finally:
        unet.set_attn_processor(before)


def unet_inputs(unet, latent: int, batch: int = 2, seed: int = 0, dtype=torch.float32, device="cpu") -> dict:
    """Classifier-free guidance's batch of 2 (uncond, cond) at `latent`² latents, 77 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, latent, latent, generator=gen)  # (B, C, H, W)
    e = torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, generator=gen)  # (B, L, D)
    return {"sample": x.to(device, dtype), "timestep": torch.tensor(500, device=device),
            "encoder_hidden_states": e.to(device, dtype)}  # fmt: skip


def wan_inputs(model, frames: int, height: int, width: int, text: int, seed: int = 0, dtype=torch.float32,
               device="cpu") -> dict:  # fmt: skip
    """One denoiser call of a Wan pipeline (it calls cond and uncond separately): batch 1, latent (C, F, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(1, c.in_channels, frames, height, width, generator=gen)  # (1, C, F, H, W)
    e = torch.randn(1, text, c.text_dim, generator=gen)  # (1, T, D)
    return {"hidden_states": x.to(device, dtype), "timestep": torch.tensor([500], device=device),
            "encoder_hidden_states": e.to(device, dtype)}  # fmt: skip
