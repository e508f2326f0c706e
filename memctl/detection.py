"""Prompt-only memorization detection: which prompts make a text-conditional model copy, without its training data.

    >>> tb = memctl.zoo.load_testbed("digits")
    >>> canary = next(c[0] for c in tb.canaries if c[2] == 16)    # a prompt trained 16 times with one image
    >>> canary
    'a two, tag hkb'
    >>> scores = detect(tb.pipeline(), ["a two", canary], reference=tb.ordinary_prompts(), progress=False)
    >>> scores[1].risk > 3 > scores[0].risk                          # the memorized prompt stands out
    True

Two signals from the first denoising step(s) of classifier-free guided sampling, where `δ = ε(x_t, prompt) -
ε(x_t, "")` is the text-conditional part of the noise prediction:

- **magnitude** (Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models"):
  the L2 norm of `δ`, averaged over seeds and recorded steps. A memorized prompt pulls the sample hard toward one
  image from the very first step, so its `δ` is large.
- **consistency** (Hintersdorf et al., NeurIPS 2024, "Finding NeMo"): how alike `δ` is across seeds. A memorized
  prompt leads every seed to the same image, so its `δ` barely depends on the starting noise. NeMo compares the
  seeds' first-step predictions by SSIM; memctl uses the mean pairwise cosine similarity, which needs no spatial
  layout (Flux and video denoisers work on token sequences).

More signals (two-step magnitude, a contrast with the prompt's own neighbour, anisotropy, sharpness) and a verdict
calibrated as a p-value (a Student-t predictive tail fitted robustly to the reference) are in `memctl.signals`; this
module's `detect` keeps the first-step reading.

`risk` is a robust z-score of log magnitude against reference prompts (the median and MAD of ordinary prompts the
user passes as `reference`, or of all scored prompts when none are given); `flagged` means risk > `threshold`.

The signals are read from inside an ordinary pipeline call: a root hook on each denoiser records its outputs,
splits each call into conditional and unconditional rows the same way the knob's `passes="cond"` does
(`memctl.passes`: one batch with the unconditional chunk first, or two calls in `cache_context("cond" /
"uncond")`), pairs two unmarked calls on the same latents conditional first (Flux img2img's true CFG, whose passes
the knob cannot tell apart), and stops the pipeline once `steps` denoising steps are recorded. So it works on every
pipeline that runs an unconditional pass (SD 1.x/2.x, SDXL, SD3, AnimateDiff, CogVideoX, Wan 2.1/2.2, Flux with
true CFG, `PixelPipeline`; class-conditional DiT with class labels in place of prompts); a pipeline without one
(guidance-distilled Flux) gets a clear error.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from memctl.blocks import require_denoisers
from memctl.defaults import THRESHOLD  # default risk above which a prompt is flagged (re-exported here)
from memctl.hooks import attached
from memctl.passes import CondRows, PassHook
from memctl.pipelines import call_parameters
from memctl.quiet import quiet

RECORD = "memctl.detect"


_NO_UNCOND = (
    "Expected a pipeline call with classifier-free guidance (an unconditional pass), but the denoiser ran the "
    "conditional pass only; pass guidance_scale > 1 (Flux: a negative_prompt and true_cfg_scale > 1), or use a "
    "pipeline that has an unconditional pass."
)


class _Stop(Exception):
    """Raised by the recorder once enough steps are recorded: ends the pipeline call early."""


class _Recorder(PassHook):
    """Root hook: records `δ = cond - uncond` of the denoiser's output for each guided step, in call order.

    Calls marked by `cache_context("cond" / "uncond")` pair up by their marks. Unmarked calls are grouped by their
    latents: one call is a guidance batch (its rows say which chunk is which), two calls on the same latents are
    the conditional then the unconditional pass (Flux img2img's true CFG). A group is recorded when the next call
    starts on other latents, or by `flush()` after the pipeline returns.
    """

    def __init__(
        self, pipe, module: torch.nn.Module, sink: list, max_steps: int, edit=None, uncond: list | None = None
    ):
        super().__init__(self._before)
        self.rows_of = CondRows(pipe, module, [])
        self.sink, self.max_steps = sink, max_steps
        self.edit = edit  # `edit(x, t) -> (x, t)`: what the denoiser sees instead (memctl.signals' probes)
        self.uncond = uncond  # where the unconditional outputs go, when asked
        self._rows: tuple[int, int, int] | None = None
        self._channels: int | None = None  # of the noisy input: a twice as wide output carries learned variance
        self._context: str | None = None
        self._pending: dict[str, torch.Tensor] = {}  # marked calls: the pass seen first, until its partner
        self._x: torch.Tensor | None = None  # the latents of the current unmarked call
        self._group: list[tuple[torch.Tensor | None, torch.Tensor, tuple[int, int, int]]] = []  # (x, out, rows)
        self.calls = 0

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.edit is not None:
            args, kwargs = _edit_call(module, self.edit, args, kwargs)
        return super().pre_forward(module, *args, **kwargs)

    def _before(self, module, context, args, kwargs) -> None:
        x = kwargs.get(self.rows_of.x_arg, args[self.rows_of.x_pos] if args else None)
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        self._context = context
        self._channels = x.shape[1] if isinstance(x, torch.Tensor) and x.ndim >= 2 else None
        self._rows = tuple(int(v) for v in self.rows_of.rows(context, x, args, kwargs, device).tolist())
        self._x = x.detach().clone() if context is None and isinstance(x, torch.Tensor) else None
        same = self._group and self._x is not None and _same(self._group[0][0], self._x)
        if not same:  # a new step: record the last one first (may stop the pipeline before this call runs)
            self.flush()

    def post_forward(self, module: torch.nn.Module, output):
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        out = out.detach().float()
        if self._channels is not None and out.ndim >= 2 and out.shape[1] == 2 * self._channels:
            out = out[:, : self._channels]  # DiT's learned sigma: keep the noise prediction
        self.calls += 1
        if self._context not in ("cond", "uncond"):
            self._group.append((self._x, out, self._rows))
            return output
        self._pending[self._context] = out  # marked calls: pair them in order
        if len(self._pending) == 2:
            uncond = self._pending.pop("uncond")
            self._record(self._pending.pop("cond") - uncond, uncond)
        return output

    def flush(self) -> None:
        """Record the unmarked calls of the last step: one guidance batch, or two calls on the same latents."""
        group, self._group = self._group, []
        if len(group) > 2:
            raise ValueError(f"Expected one or two denoiser calls per step, but got {len(group)} on the same latents.")
        if len(group) == 2:  # the conditional pass first, as diffusers' true-CFG pipelines call them
            self._record(group[0][1] - group[1][1], group[1][1])
        elif group:
            _, out, (k, a, b) = group[0]
            if (k, a, b) == (1, 0, 0):  # a call without an unconditional part
                raise ValueError(_NO_UNCOND)
            chunks = out.reshape(k, -1, *out.shape[1:])
            self._record(chunks[1 if a == 0 else 0] - chunks[a], chunks[a])

    def _record(self, delta: torch.Tensor, uncond: torch.Tensor) -> None:
        self.sink.append(delta.cpu())
        if self.uncond is not None:
            self.uncond.append(uncond.cpu())
        if len(self.sink) >= self.max_steps:
            raise _Stop


def _edit_call(module: torch.nn.Module, edit, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call with its latents (first argument) and timestep replaced by `edit(x, t)`."""
    import inspect

    names = list(inspect.signature(type(module).forward).parameters)[1:]
    args = list(args)
    values = {n: (kwargs[n] if n in kwargs else args[i] if i < len(args) else None) for i, n in enumerate(names[:2])}
    x, t = edit(values[names[0]], values[names[1]])
    for i, (n, v) in enumerate(zip(names[:2], (x, t), strict=True)):
        if n in kwargs or i >= len(args):
            kwargs[n] = v
        else:
            args[i] = v
    return tuple(args), kwargs


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.shape == b.shape and torch.equal(a, b)


def prompt_lines(text: str) -> list[str]:
    """Prompts from text, one per line: stripped; blank lines and lines starting with '#' are skipped."""
    return [p for p in (line.strip() for line in text.splitlines()) if p and not p.startswith("#")]


def condition_argument(pipe, conditions: list) -> str:
    """The pipeline argument the conditions go to: `prompt` (text) or `class_labels` (class-conditional, e.g. DiT)."""
    params = call_parameters(pipe)  # through FidelityMixin's `(*args, fidelity=..., **kwargs)`
    texts = all(isinstance(c, str) for c in conditions)
    labels = all(isinstance(c, int) and not isinstance(c, bool) for c in conditions)
    if texts and "prompt" in params:
        return "prompt"
    if labels and "class_labels" in params:
        return "class_labels"
    expected = "prompts (str)" if "prompt" in params else "class labels (int)" if "class_labels" in params else None
    if expected is None:
        raise ValueError(
            f"Expected a conditional pipeline (its __call__ takes `prompt` or `class_labels`), but the __call__ of "
            f"{type(pipe).__name__} takes neither: ({', '.join(params)}); detection reads the conditional part of "
            "the noise prediction."
        )
    raise ValueError(f"Expected {expected} for {type(pipe).__name__}, but got {conditions[:3]!r}.")


def noise_differences(
    pipe,
    prompts: list[str],
    seed: int,
    steps: int = 1,
    guidance_scale: float = 7.5,
    edit=None,
    uncond: list | None = None,
    **call_kwargs,
) -> torch.Tensor:
    """`δ` of the first `steps` steps for `prompts` under one seed (every prompt starts from the same noise):
    `(len(prompts), steps, F)` flattened. `edit(x, t) -> (x, t)` replaces what the denoiser is called on (the
    pipeline is stopped after the recorded steps, so nothing downstream sees it); `uncond`, a list, receives the
    unconditional outputs of the recorded steps."""
    arg = condition_argument(pipe, prompts)
    found = require_denoisers(pipe)
    sink: list[torch.Tensor] = []
    gens = [torch.Generator().manual_seed(seed) for _ in prompts]
    recorders = [_Recorder(pipe, m, sink, steps, edit, uncond) for m in found.values()]
    with ExitStack() as stack:  # every expert (Wan 2.2) records into the one sink, in call order
        for m, recorder in zip(found.values(), recorders, strict=True):
            stack.enter_context(attached(m, {"": recorder}, RECORD))
        try:
            pipe(**{arg: list(prompts)}, generator=gens, guidance_scale=guidance_scale, **call_kwargs)
            for recorder in recorders:  # the last step's unmarked calls
                recorder.flush()
        except _Stop:
            pass
    if not sink and any(r.calls for r in recorders):  # two-call pipelines that never ran the "uncond" call
        raise ValueError(_NO_UNCOND)
    if len(sink) < steps:
        raise ValueError(
            f"Expected {steps} guided denoising steps, but the pipeline ran {len(sink)}; lower `steps` or raise "
            "num_inference_steps."
        )
    return torch.stack([d.reshape(len(prompts), -1) for d in sink[:steps]], dim=1)


@dataclass(frozen=True)
class PromptScore:
    """Memorization risk of one prompt (see the module docstring)."""

    prompt: str | int  # a class label for class-conditional models
    magnitude: float
    consistency: float
    risk: float
    flagged: bool
    signals: dict = field(default_factory=dict)  # `memctl.signals.screen`: each signal's value
    p_value: float | None = None  # `memctl.signals.screen`: against ordinary prompts and decoys made from them

    def to_dict(self) -> dict:
        """The fields; `signals` and `p_value` only when set (`memctl.detect` leaves them out, as before)."""
        out = asdict(self)
        if not self.signals:
            out.pop("signals")
        elif math.isnan(self.consistency):  # `screen` does not read consistency
            out.pop("consistency")
        if self.p_value is None:
            out.pop("p_value")
        return out


def signals(
    pipe,
    prompts: list[str],
    seeds: int | list[int] = 4,
    steps: int = 1,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    progress: bool = True,
    **call_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(magnitude (P,), consistency (P,))` of each prompt over `seeds` (a count from 0, or a list)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"Expected a non-empty list of prompt strings, but got {prompts!r:.200}.")
    condition_argument(pipe, list(prompts))  # prompts for text models, class labels for class-conditional ones
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) < 2:
        raise ValueError(f"Expected at least 2 seeds (consistency compares seeds), but got {seed_list}.")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"Expected steps a positive int, but got {steps!r}.")
    if not (math.isfinite(guidance_scale) and guidance_scale > 1):
        raise ValueError(f"Expected guidance_scale > 1 (it reads the unconditional pass), but got {guidance_scale}.")
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    deltas = []  # per seed: (P, steps, F)
    bar = tqdm(total=len(seed_list) * len(chunks), desc="detect", unit="batch", disable=not progress)
    with quiet(pipe):  # one bar for the whole loop, not a half-finished one per call; no repeated warnings
        for seed in seed_list:
            parts = []
            for chunk in chunks:
                parts.append(noise_differences(pipe, chunk, seed, steps, guidance_scale, **call_kwargs))
                bar.update()
            deltas.append(torch.cat(parts))
    bar.close()
    d = torch.stack(deltas, dim=1)  # (P, S, steps, F)
    magnitude = d.norm(dim=-1).mean(dim=(1, 2))
    first = torch.nn.functional.normalize(d[:, :, 0], dim=-1)  # (P, S, F)
    cos = first @ first.transpose(1, 2)  # (P, S, S)
    s = len(seed_list)
    consistency = (cos.sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)) / (s * (s - 1))
    return magnitude, consistency


def robust_z(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`(values - median(reference)) / (1.4826 MAD(reference))`, the MAD floored at 1e-6 of the median."""
    med = reference.median()
    mad = (reference - med).abs().median() * 1.4826
    return (values - med) / mad.clamp(min=1e-6 * med.abs().clamp(min=1e-12))


def detect(
    pipe,
    prompts: list[str],
    seeds: int | list[int] = 4,
    steps: int = 1,
    guidance_scale: float = 7.5,
    reference: list[str] | None = None,
    threshold: float = THRESHOLD,
    batch_size: int = 8,
    progress: bool = True,
    **call_kwargs,
) -> list[PromptScore]:
    """Score `prompts` for memorization risk; `reference`: ordinary prompts that calibrate `risk` (optional)."""
    kw = dict(seeds=seeds, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, progress=progress)
    magnitude, consistency = signals(pipe, prompts, **kw, **call_kwargs)
    log_m = magnitude.clamp(min=1e-12).log()
    if reference:
        ref = signals(pipe, list(reference), **kw, **call_kwargs)[0].clamp(min=1e-12).log()
    else:
        ref = log_m
    risk = robust_z(log_m, ref)
    return [
        PromptScore(p, float(m), float(c), float(r), bool(r > threshold))
        for p, m, c, r in zip(prompts, magnitude, consistency, risk, strict=True)
    ]


def roc_auc(positive: list[float] | torch.Tensor, negative: list[float] | torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2): the ROC AUC."""
    pos, neg = torch.as_tensor(positive, dtype=torch.float64), torch.as_tensor(negative, dtype=torch.float64)
    if not len(pos) or not len(neg):
        raise ValueError(f"Expected positives and negatives, but got {len(pos)} and {len(neg)}.")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
