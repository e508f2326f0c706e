"""NeMo (Hintersdorf et al., NeurIPS 2024, "Finding NeMo: localizing neurons responsible for memorization in
diffusion models"): value-projection neurons of the cross-attentions whose activation on a prompt is out of
distribution are switched off for that prompt."""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from memctl.baselines.base import Baseline, general_prompts, prompt_states


class _Deactivate(ModelHook):
    """On a cross-attention's `to_v`: zero, per row, the output channels whose z-score on that row's conditioning
    (mean |activation| over tokens, against the general prompts' mean and std) exceeds θ."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, theta: float, counter: list[int]):
        super().__init__()
        self.mean, self.std, self.theta, self.counter = mean, std, theta, counter

    def post_forward(self, module, output):
        z = (output.abs().mean(1) - self.mean.to(output)) / self.std.to(output)  # (B, C)
        off = z > self.theta
        self.counter[0] += int(off.sum())
        return output * (~off)[:, None, :].to(output.dtype)


class NeMo(Baseline):
    """Out-of-distribution value neurons off, per prompt (NeMo's initial selection, with θ a z-score)."""

    name = "nemo"

    def __init__(self, pipe, theta: float | None = None, quantile: float = 0.999):
        super().__init__(pipe)
        self.theta, self.quantile = theta, float(quantile)
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.deactivated = [0]  # neurons switched off, summed over calls and rows

    def _values(self) -> dict[str, torch.nn.Module]:
        found = {
            f"{name}.to_v": module.to_v
            for name, module in self.denoiser.named_modules()
            if getattr(module, "is_cross_attention", False) and hasattr(module, "to_v")
        }
        if not found:
            raise ValueError(f"Expected cross-attention modules in {type(self.denoiser).__name__}, but found none.")
        return found

    def fit(self, probes) -> NeMo:
        """Per neuron mean and std of the general probe prompts' activations (and the empty prompt's); θ, unless
        given, is the `quantile` of the general prompts' own z-scores: they rarely lose a neuron."""
        states = prompt_states(self.pipe, general_prompts(probes) + [""])
        zs = []
        with torch.no_grad():
            for path, to_v in self._values().items():
                act = to_v(states.to(to_v.weight.dtype)).abs().mean(1)  # (P, C)
                mean, std = act.mean(0), act.std(0).clamp_min(1e-6)
                self.stats[path] = (mean, std)
                zs.append(((act - mean) / std).flatten())
        if self.theta is None:
            self.theta = float(torch.cat(zs).float().quantile(self.quantile))
        return self

    def settings(self) -> dict:
        return {"theta": self.theta, "quantile": self.quantile}

    def hooks(self):
        if not self.stats or self.theta is None:
            raise ValueError("Expected NeMo.fit(probes) before use, but it has no statistics yet.")
        return {path: _Deactivate(*self.stats[path], self.theta, self.deactivated) for path in self._values()}
