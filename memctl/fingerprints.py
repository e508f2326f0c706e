"""Which model a block map was made for: a fingerprint of a denoiser's config and a strided sample of its weights.

>>> fingerprint(torch.nn.Linear(2, 2)).count("-")
1
"""

from __future__ import annotations

import hashlib
import json

import torch

from memctl.blocks import unwrap

__all__ = ["default_component", "fingerprint"]

_SAMPLES_PER_TENSOR = 16


def default_component(model: torch.nn.Module) -> str:
    """The pipeline attribute a denoiser usually lives under: "unet" for UNets, else "transformer"."""
    return "unet" if type(unwrap(model)).__name__.startswith("UNet") else "transformer"


def _config_json(model: torch.nn.Module) -> str:
    config = {k: v for k, v in dict(getattr(model, "config", {}) or {}).items() if not k.startswith("_")}
    return json.dumps({"class": type(model).__name__, "config": config}, sort_keys=True, default=str)


def _weight_sample(model: torch.nn.Module) -> tuple[list[tuple[str, tuple[int, ...]]], torch.Tensor]:
    """Names and shapes of the state dict, and a deterministic strided sample of each tensor, (N,) float32."""
    keys, parts = [], []
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        keys.append((name, tuple(tensor.shape)))
        parts.append(flat[::step][:_SAMPLES_PER_TENSOR].float().cpu())
    return keys, torch.cat(parts) if parts else torch.zeros(0)


def _fingerprint_and_sample(model: torch.nn.Module) -> tuple[str, torch.Tensor]:
    model = unwrap(model)
    keys, sample = _weight_sample(model)
    config = hashlib.sha256(_config_json(model).encode()).hexdigest()[:16]
    weights = hashlib.sha256(json.dumps(keys).encode() + sample.numpy().tobytes()).hexdigest()[:16]
    return f"{config}-{weights}", sample


def fingerprint(model: torch.nn.Module) -> str:
    """`"<config sha256[:16]>-<weights sha256[:16]>"` of a denoiser; fast even for large models (strided sample).

    >>> fingerprint(torch.nn.Linear(2, 2)).count("-")
    1
    """
    return _fingerprint_and_sample(model)[0]


def _same_up_to_cast(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return any(torch.equal(a.to(d).float(), b.to(d).float()) for d in (torch.float32, torch.float16, torch.bfloat16))
