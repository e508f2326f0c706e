"""`PixelPipeline`: text-to-image in pixel space, shaped like `StableDiffusionPipeline` without the VAE.

>>> import memctl
>>> pipe = memctl.load_default()
>>> image = pipe("a seven", num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images[0]
>>> image.size
(16, 16)

Prompts are encoded as in `StableDiffusionPipeline` (tokenizer padded to `model_max_length`,
`text_encoder(ids)[0]`, the empty prompt for classifier-free guidance), so any CLIP tokenizer / encoder /
`UNet2DConditionModel` trio whose UNet works on image channels runs here. DDIM sampling (Song et al. 2021).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from memctl.knob import temporary_knob
from memctl.options import short_repr


class PixelPipeline(DiffusionPipeline):
    """Text-conditional pixel-space diffusion with an optional memctl `fidelity=` knob."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, tokenizer, text_encoder, unet, scheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler)

    def _check_prompts(self, prompt: str | list[str], name: str) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise TypeError(f"Expected `{name}` to be a str or a non-empty list of str, but got {prompt!r}.")
        limit = self.tokenizer.model_max_length
        for p in prompts:
            n = len(self.tokenizer(p).input_ids)
            if n > limit:
                raise ValueError(
                    f"Expected `{name}` of at most {limit} tokens (with start and end), but got {n} for "
                    f"{short_repr(p)}. "
                    "Shorten the prompt: this model's text encoder cannot see past its last position."
                )
        return list(prompts)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """`(B, L, D)` text states, as `StableDiffusionPipeline` computes them."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self._execution_device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        fidelity: float | None = None,
        block_map: Any = None,
        fidelity_start: float | None = None,
        fidelity_stop: float | None = None,
        callback_on_step_end=None,
    ):
        """Sample images; `fidelity` (with the map applied by `memctl.apply_knob` or passed as `block_map`)
        turns the memorization knob for this call only."""
        prompts = self._check_prompts(prompt, "prompt")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"Expected output_type 'pil', 'np' or 'pt', but got {output_type!r}.")
        if not (isinstance(num_inference_steps, int) and num_inference_steps >= 1):
            raise ValueError(f"Expected num_inference_steps a positive int, but got {num_inference_steps!r}.")
        if not math.isfinite(float(guidance_scale)) or guidance_scale < 0:
            raise ValueError(f"Expected guidance_scale a finite number >= 0, but got {guidance_scale!r}.")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [""] * len(prompts)
        if negative_prompt is not None:
            negatives = self._check_prompts(negative_prompt, "negative_prompt")
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
            if len(negatives) != len(prompts):
                raise ValueError(f"Expected 1 or {len(prompts)} negative prompts, but got {len(negatives)}.")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"Expected {len(prompts)} generators (one per image), but got {len(generator)}.")
        if fidelity is None and block_map is None and (fidelity_start, fidelity_stop) != (None, None):
            raise ValueError("Expected `fidelity=` with fidelity_start/fidelity_stop, but got no fidelity.")
        self._guidance_scale = float(guidance_scale)  # as diffusers pipelines keep it: hooks read whether we guide
        with temporary_knob(self, fidelity, block_map, fidelity_start, fidelity_stop):
            images = self._sample(
                prompts, negatives, num_inference_steps, guidance_scale, generator, callback_on_step_end
            )
        images = (images / 2 + 0.5).clamp(0, 1)  # (B, C, H, W) in [0, 1]
        if output_type == "pt":
            out = images
        else:
            out = images.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, C)
            if output_type == "pil":
                out = [_to_pil(x) for x in out]
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current (or last) call runs the unconditional pass: guidance scale other than 1."""
        return getattr(self, "_guidance_scale", 1.0) != 1.0

    def _sample(self, prompts, negatives, steps, guidance_scale, generator, callback_on_step_end):
        device, use_cfg = self._execution_device, self.do_classifier_free_guidance  # w < 1 mixes toward uncond
        cond = self.encode_prompt(prompts)
        if use_cfg:
            cond = torch.cat([self.encode_prompt(negatives), cond])
        cfg = self.unet.config
        shape = (len(prompts), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)  # (B, C, H, W)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(steps, device=device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            inp = torch.cat([x, x]) if use_cfg else x
            inp = self.scheduler.scale_model_input(inp, t)
            eps = self.unet(inp, t, encoder_hidden_states=cond.to(x.dtype)).sample
            if use_cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance_scale * (text - uncond)
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": x})
        return x


def _to_pil(x: np.ndarray) -> Image.Image:
    arr = (x * 255).round().astype("uint8")
    return Image.fromarray(arr[..., 0], mode="L") if arr.shape[-1] == 1 else Image.fromarray(arr)
