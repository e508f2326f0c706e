"""Baselines that act on the denoiser's conditioning per call: Wen et al. 2024 and Jain et al. 2025."""

from __future__ import annotations

import torch

from memctl.baselines.base import Baseline, InputsHook, cfg_rows, general_prompts, input_states, like


def _first_step_magnitude(denoiser, x, t, e, null) -> torch.Tensor:
    """Per row ‖ε(x, e) − ε(x, ∅)‖ (Wen et al.'s detection signal)."""
    out = denoiser(x, t, encoder_hidden_states=e).sample - denoiser(x, t, encoder_hidden_states=null).sample
    return out.flatten(1).norm(dim=1)


class Wen(Baseline):
    """Prompt-embedding optimization at the first step (Wen et al., ICLR 2024, "Detecting, explaining, and
    mitigating memorization in diffusion models"): Adam on the conditional text states, `steps` at most, until
    ‖ε(x_T, e) − ε(x_T, ∅)‖ is below `target`; the optimized states are used for the whole sample."""

    name = "wen"

    def __init__(self, pipe, steps: int = 10, lr: float = 0.05, quantile: float = 0.5, target: float | None = None):
        super().__init__(pipe)
        if steps < 1 or lr <= 0 or not 0 < quantile < 1:
            raise ValueError(f"Expected steps >= 1, lr > 0, 0 < quantile < 1, but got {steps}, {lr}, {quantile}.")
        self.steps, self.lr, self.quantile, self.target = int(steps), float(lr), float(quantile), target
        self.null = input_states(pipe, [""])
        self._last_t: float | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (original rows, optimized rows)
        self._general: tuple | None = None  # (general probes' states, seeds, seed) from `fit`
        self.calibrated_on: list[int] | None = None  # the latent shape of the calibration noise
        self.extra_rows = 0  # rows × denoiser evaluations spent optimizing (a forward and a backward count 1 each)

    def fit(self, probes, seeds: int = 4, seed: int = 0) -> Wen:
        """`target` = the `quantile` of the general probe prompts' first-step magnitudes, at probe noise of the
        denoiser's latent size (`sample_size`: UNets); a denoiser that takes its size per call (video transformers)
        is calibrated at its first call, on noise of that call's latent shape."""
        self._general = (input_states(self.pipe, general_prompts(probes)), seeds, seed)
        cfg = self.denoiser.config
        if getattr(cfg, "sample_size", None) is not None:
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
            self._calibrate((cfg.in_channels, size, size))
        return self

    def _calibrate(self, shape: tuple[int, ...], denoiser=None) -> None:
        general, seeds, seed = self._general
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(len(general) * seeds, *shape, generator=gen)
        e = general.repeat_interleave(seeds, 0)
        t = torch.full((len(x),), self._first_timestep(), dtype=torch.long)
        with torch.no_grad():
            m = _first_step_magnitude(denoiser or self.denoiser, x, t, e, like(self.null, e))
        self.target = float(m.quantile(self.quantile))
        self.calibrated_on = list(shape)

    def _first_timestep(self) -> int:
        sched = getattr(self.pipe, "scheduler", None)
        return int(getattr(getattr(sched, "config", None), "num_train_timesteps", 1000)) - 1

    def settings(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "quantile": self.quantile, "target": self.target,
                **({"calibrated_on": self.calibrated_on} if self.calibrated_on else {})}  # fmt: skip

    def _edit(self, hook, x, t, e):
        if self.target is None and self._general is not None:  # a per-call latent size: calibrate on this one
            self._calibrate(tuple(x.shape[1:]), hook.fn_ref.forward)  # the denoiser below this hook
        if self.target is None:
            raise ValueError("Expected Wen.fit(probes) (or target=) before use, but no target is set.")
        k = cfg_rows(x, self.pipe, hook.context.name)
        if k == len(x):  # the unconditional call of a two-call pipeline (Wan): nothing to optimize
            return e
        tt = float(t.float().max()) if isinstance(t, torch.Tensor) else float(t)
        first = self._last_t is None or tt > self._last_t  # a new sample starts at its largest timestep
        self._last_t = tt
        if first:
            self._cache = (e[k:].clone(), self._optimize(hook, x[k:], t, e[k:]))
        orig, opt = self._cache
        if orig.shape != e[k:].shape or not torch.equal(orig, e[k:]):
            return e
        return torch.cat([e[:k], opt.to(e.dtype)])

    def _optimize(self, hook, x, t, e):
        forward = hook.fn_ref.forward  # the denoiser below this hook
        t = t[: len(x)] if isinstance(t, torch.Tensor) and t.ndim == 1 and len(t) > len(x) else t
        with torch.no_grad():
            uncond = forward(x, t, encoder_hidden_states=like(self.null, e)).sample
        self.extra_rows += len(x)
        z = e.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                m = (forward(x, t, encoder_hidden_states=z).sample - uncond).flatten(1).norm(dim=1)
                self.extra_rows += len(x)
                above = m > self.target
                if not above.any():
                    break
                (grad,) = torch.autograd.grad(m[above].sum(), z)  # no gradient into the denoiser's weights
                self.extra_rows += len(x)
                opt.zero_grad()
                z.grad = grad * above[:, None, None].to(grad.dtype)
                opt.step()
        return z.detach()

    def hooks(self):
        self._last_t, self._cache = None, None
        return {"": InputsHook(self._edit)}


class Jain(Baseline):
    """A static transition point (Jain et al., CVPR 2025, "Classifier-free guidance inside the attraction basin may
    cause memorization"): the text conditioning is replaced by the empty prompt's while the normalized noise level
    is above `transition` (no guidance: the unconditional prediction), then sampling goes on as usual."""

    name = "jain"

    def __init__(self, pipe, transition: float = 0.7):
        super().__init__(pipe)
        if not 0 <= transition <= 1:
            raise ValueError(f"Expected a transition noise level in [0, 1], but got {transition!r}.")
        self.transition = float(transition)
        self.null = input_states(pipe, [""])
        sched = getattr(pipe, "scheduler", None)
        self.scale = float(getattr(getattr(sched, "config", None), "num_train_timesteps", 1000))

    def settings(self) -> dict:
        return {"transition": self.transition}

    def _edit(self, hook, x, t, e):
        level = (t.float().max() if isinstance(t, torch.Tensor) else torch.tensor(float(t))) / self.scale
        if float(level) <= self.transition:
            return e
        return like(self.null, e)

    def hooks(self):
        return {"": InputsHook(self._edit)}
