"""What a denoiser's cross-attention reads for each prompt: the states the condition lever is fitted on and pulls.

PixelPipeline, SD 1.x/2.x, SDXL and AnimateDiff read `encode_prompt`'s states; Wan 2.1/2.2 read them through a
text projection inside the transformer (each Wan 2.2 expert its own).
"""

from __future__ import annotations

import inspect

import torch

WAN_TOKENS = 512  # WanPipeline.__call__'s default max_sequence_length


def text_states(pipe, prompts: list[str], component: str = "transformer") -> torch.Tensor:
    """What the denoiser's cross-attention reads for each prompt: `(P, L, D)`. PixelPipeline, SD 1.x/2.x, SDXL and
    AnimateDiff: the `encode_prompt` states. Wan 2.1/2.2: those states through the text projection of `component`
    (`condition_embedder.text_embedder`; Wan 2.2's experts each have their own), which every block's `attn2` reads."""
    params = inspect.signature(pipe.encode_prompt).parameters if hasattr(pipe, "encode_prompt") else {}
    if list(params) == ["prompts"]:  # memctl.PixelPipeline
        return pipe.encode_prompt(prompts)
    if "do_classifier_free_guidance" in params and "device" in params and hasattr(pipe, "unet"):
        out = pipe.encode_prompt(
            prompts, device=pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return out[0]
    denoiser = getattr(pipe, component, None)
    project = getattr(getattr(denoiser, "condition_embedder", None), "text_embedder", None)
    if "do_classifier_free_guidance" in params and project is not None and type(denoiser).__name__.startswith("Wan"):
        states = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=pipe._execution_device, max_sequence_length=WAN_TOKENS
        )[0]  # zero-padded to the call's default length: the lever's bank then matches a plain call
        return project(states.to(next(project.parameters()).dtype))
    raise ValueError(
        f"Expected a pipeline whose denoiser cross-attends to its encode_prompt states (memctl.PixelPipeline, "
        f"StableDiffusion 1.x/2.x, SDXL, AnimateDiff, Wan) for method 'prompt', but got {type(pipe).__name__}."
    )
