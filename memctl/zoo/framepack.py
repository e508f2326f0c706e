"""`FramePackVAE`: the exact, weight-free "autoencoder" of the moving-digits testbed, so that its clips run through
diffusers' own `WanPipeline` in pixel space.

Wan's causal VAE keeps the first frame on its own and packs the following frames in groups. This one does the same
with no loss and no weights: latent frame 0 is frame 0 (repeated over the group's channels), latent frame j ≥ 1 is
frames `2j-1, 2j` stacked on the channel axis. So `scale_factor_temporal` is 2 (clips of `1 + 2n` frames, as
`WanPipeline` expects), `scale_factor_spatial` is 1, and `decode(encode(x))` is `x` exactly.

>>> vae = FramePackVAE(channels=1)
>>> x = torch.rand(2, 1, 9, 16, 16) * 2 - 1
>>> z = vae.encode(x).latents
>>> tuple(z.shape)
(2, 2, 5, 16, 16)
>>> bool((vae.decode(z, return_dict=False)[0] == x).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class FramePackOutput(BaseOutput):
    latents: torch.Tensor


@dataclass
class FramePackDecoderOutput(BaseOutput):
    sample: torch.Tensor


class FramePackVAE(ModelMixin, ConfigMixin):
    """`(B, C, 1 + 2n, H, W)` pixels in [-1, 1] ↔ `(B, 2C, 1 + n, H, W)` latents, exactly (see the module doc)."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        channels: int = 1,
        group: int = 2,
        z_dim: int | None = None,
        scale_factor_temporal: int | None = None,
        scale_factor_spatial: int = 1,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
    ):
        super().__init__()
        # what WanPipeline reads from its VAE's config, derived from (channels, group); saved configs must agree
        z = channels * group
        derived = dict(z_dim=z, scale_factor_temporal=group, scale_factor_spatial=1,
                       latents_mean=[0.0] * z, latents_std=[1.0] * z)  # fmt: skip
        given = dict(z_dim=z_dim, scale_factor_temporal=scale_factor_temporal,
                     scale_factor_spatial=scale_factor_spatial, latents_mean=latents_mean,
                     latents_std=latents_std)  # fmt: skip
        for k, v in given.items():
            if v is not None and v != derived[k]:
                raise ValueError(f"Expected {k}={derived[k]!r} for channels={channels}, group={group}, but got {v!r}.")
        self.register_to_config(**derived)
        # diffusers reads a model's dtype and device from its parameters or buffers: one constant buffer, saved
        self.register_buffer("unit", torch.ones(1))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        g = self.config.group
        if x.ndim != 5 or x.shape[1] != self.config.channels or (x.shape[2] - 1) % g:
            raise ValueError(
                f"Expected a video (B, {self.config.channels}, 1 + {g}n, H, W), but got {tuple(x.shape)}."
            )
        first = x[:, :, :1].repeat(1, g, 1, 1, 1)  # (B, gC, 1, H, W)
        b, c, f, h, w = x.shape
        rest = x[:, :, 1:].reshape(b, c, (f - 1) // g, g, h, w).permute(0, 3, 1, 2, 4, 5).reshape(b, g * c, -1, h, w)
        z = torch.cat([first, rest], dim=2)
        return FramePackOutput(latents=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        g, c = self.config.group, self.config.channels
        if z.ndim != 5 or z.shape[1] != g * c:
            raise ValueError(f"Expected latents (B, {g * c}, T, H, W), but got {tuple(z.shape)}.")
        b, _, t, h, w = z.shape
        first = z[:, :, :1].reshape(b, g, c, 1, h, w).mean(1)  # the repeated first frame
        rest = z[:, :, 1:].reshape(b, g, c, t - 1, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, (t - 1) * g, h, w)
        x = torch.cat([first, rest], dim=2)
        return FramePackDecoderOutput(sample=x) if return_dict else (x,)
