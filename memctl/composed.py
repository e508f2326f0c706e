"""Composed extrapolation: fidelity < 0 without ever evaluating the exact prompt, the prompt rebuilt from its parts.

    >>> with composed(pipe, fidelity=-1.0):              # "a two, small, bold, leaning left" → its parts
    ...     images = pipe(prompts).images
    >>> attach_composed(pipe, parts=my_parts); set_composed(pipe, -0.5); ...; detach_composed(pipe)
    >>> with composed(video_pipe, -1.0, start=0.7, stop=1.0): ...   # only at high noise

Why: where memorized prompts are made of ordinary words (digits-attr, moving-digits: every attribute and every
sub-caption was trained on many images; only the exact combination is bound to one image), the condition lever
pulls the caption's heavy tokens toward another caption and so changes what the prompt asks for. This lever keeps
what each *part* of the prompt says and drops what only the exact whole says. For a prompt with a common part `d`
and attributes `a_1..a_n` (n >= 2), the denoiser's prediction `s(c)` is replaced by

    s(c)  →  (Σ_j s(c_-j) - s(d)) / (n - 1)

where `c_-j` is the prompt without attribute j. If the attributes are independent given the sample (the assumption
of composable diffusion, Liu et al. 2022: `s(c) = s_u + g_d + Σ_i g_i`), this is exactly `s(c)`; it needs no
constant. What the exact prompt alone carries (the memorized image) is not in any `s(c_-j)`. Fidelity f in [-1, 0]
mixes: `s(c) + |f| (composed - s(c))`; at 0 the hook returns the denoiser's output untouched (no extra pass).

Cost: n + 1 extra conditional rows per composed prompt and step at -1 < f < 0 (digits-attr: 5 evaluations instead
of 1). At f = -1 the prompt's own prediction is not needed, so its rows are given its first part instead and n extra
rows run (4 instead of 1): the exact prompt is never evaluated at all. No block map is needed. Prompts with fewer
than 2 attributes, the unconditional rows of classifier-free guidance and any conditioning that was not encoded while
attached pass unchanged.

Window: `start` / `stop` (noise level = timestep / num_train_timesteps, as the knob's window) bound where it acts.
Where a model decides what it copies differs: the embedded video model fixes a clip's layout (and so the memorized
trajectory) at high noise, and composing only above 0.7 keeps the motion the caption asks for; the pixel digits
models copy from every level. `calibrate_window` picks the window per model from the probe set's memorized pairs.

How rows are found: `attach_composed` wraps the pipeline's `encode_prompt`; each prompt it encodes is split by
`parts` (default `comma_parts`: the first comma-separated phrase is the common part, each later phrase an
attribute), the parts are encoded by the same `encode_prompt`, and the prompt's states are remembered. The root hook
on each denoiser matches the rows of `encoder_hidden_states` to remembered states by value (exact) once per
conditioning tensor and runs the parts' rows in one extra forward. The states of the last two encode calls that had
prompts to compose are kept (a pipeline call encodes before it samples); older ones are let go. Supported: denoisers
whose only per-row conditioning is `encoder_hidden_states` (memctl.PixelPipeline, SD 1.x/2.x, Wan 2.1); others
(SDXL's `added_cond_kwargs`, SD3 / Flux pooled projections) are refused at attach with an error. Prompts passed as
`prompt_embeds` have no text to split and are sampled as they are.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook

from memctl.blocks import require_denoisers
from memctl.guidance import _first, _with_first
from memctl.hooks import _arg_position, _get_arg, _set_arg, latents_arg, recent, tensor_key, unkeyable
from memctl.registry import attach, detach

__all__ = [
    "Parts",
    "Composed",
    "comma_parts",
    "parts_for",
    "require_parts",
    "check_denoiser",
    "attach_composed",
    "set_composed",
    "detach_composed",
    "composed",
    "calibrate_window",
    "WINDOW_STARTS",
]

HOOK = "memctl.composed"
_ATTR = "_memctl_composed"


@dataclass(frozen=True)
class Parts:
    """A prompt's parts: the prompt without each of its attributes, and the part common to all of them."""

    without: tuple[str, ...]
    common: str

    def __post_init__(self):
        if len(self.without) < 2 or not all(isinstance(p, str) for p in (*self.without, self.common)):
            raise ValueError(
                f"Expected Parts with at least 2 prompts in `without` and a str `common`, but got {self!r}."
            )


def comma_parts(prompt: str) -> Parts | None:
    """The first comma-separated phrase is the common part, each later phrase an attribute; None below 2 attributes.

    >>> comma_parts("a two, small, bold, leaning left").without
    ('a two, bold, leaning left', 'a two, small, leaning left', 'a two, small, bold')
    >>> comma_parts("a two moving right, slowly") is None
    True
    """
    phrases = [p.strip() for p in prompt.split(",") if p.strip()]
    common, attributes = phrases[0] if phrases else "", phrases[1:]
    if len(attributes) < 2:
        return None
    without = [", ".join([common] + attributes[:j] + attributes[j + 1 :]) for j in range(len(attributes))]
    return Parts(tuple(without), common)


def _probe_key(row: torch.Tensor) -> tuple:
    """A few values of a conditioning row, to find candidate matches before an exact comparison."""
    flat = row.reshape(-1)
    idx = torch.linspace(0, len(flat) - 1, 8, device=flat.device).long()
    return (tuple(row.shape), row.dtype, *flat[idx].tolist())


class _Table:
    """The states of each encoded prompt and of its parts, for the last `calls` encode calls that had any (a pipeline
    call encodes its prompts once before sampling, so its rows are found; older calls' states are let go)."""

    def __init__(self, calls: int = 2):
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per encode call: (states, parts' states)
        self.keep = calls
        self._index: dict[tuple, dict[tuple, list]] = {}  # (dtype, device) -> probe key -> [(states cast, parts)]

    @property
    def entries(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [e for call in self.calls for e in call]

    def new_call(self) -> None:
        self.calls = [*self.calls[-(self.keep - 1) :], []] if self.keep > 1 else [[]]
        self._index.clear()

    def add(self, states: torch.Tensor, parts: torch.Tensor) -> None:
        if not self.calls:
            self.new_call()
        if not any(s.shape == states.shape and torch.equal(s, states) for s, _ in self.calls[-1]):
            self.calls[-1].append((states, parts))
            self._index.clear()

    def find(self, row: torch.Tensor) -> torch.Tensor | None:
        """The parts' states of the prompt whose states equal `row` (in `row`'s dtype: a pipeline may cast)."""
        index = self._index.get((row.dtype, row.device))
        if index is None:
            index = self._index[(row.dtype, row.device)] = {}
            for states, parts in self.entries:
                cast = states.to(row.device, row.dtype)
                index.setdefault(_probe_key(cast), []).append((cast, parts))
        for states, parts in index.get(_probe_key(row), []):
            if torch.equal(states, row):
                return parts
        return None


class ComposedHook(ModelHook):
    """Root hook of a denoiser: the rows of known prompts get `s + weight (composed - s)` while `weight > 0`."""

    def __init__(self, table: _Table, size: int = 4, window: tuple[float, float] = (0.0, 1.0), scale: float = 1000.0):
        super().__init__()
        self.table, self.size = table, size
        self.window, self.scale = window, scale  # noise levels timestep / scale where it acts
        self.weight = 0.0  # |f|: a Python float, so fidelity 0 runs nothing extra
        self._inputs: tuple[tuple, dict] | None = None
        self._first: list | None = None  # at weight 1: the matches whose rows pre_forward gave their first part
        self._matches: dict[tuple, list] = {}  # tensor key of a conditioning -> [states kept alive, matches]
        self.extra_rows = 0  # denoiser rows this hook ran (cost accounting)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._x = latents_arg(module)
        self._pos = {a: _arg_position(module, a) for a in (self._x, "timestep", "encoder_hidden_states")}
        return module

    def _inside(self, args: tuple, kwargs: dict) -> bool:
        """Whether this call's noise level (largest timestep of the batch / scale) lies in the window."""
        if self.window == (0.0, 1.0):
            return True
        t = _get_arg(args, kwargs, "timestep", self._pos["timestep"])
        level = float(torch.as_tensor(t).float().max()) / self.scale
        return self.window[0] <= level <= self.window[1]

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        active = self.weight > 0 and self._inside(args, kwargs)
        self._inputs, self._first = ((args, kwargs) if active else None), None
        if active and self.weight == 1.0:  # the prompt's own prediction is not used: its rows read the first part
            e = _get_arg(args, kwargs, "encoder_hidden_states", self._pos["encoder_hidden_states"])
            if isinstance(e, torch.Tensor) and (matches := self._match(e)):
                e2 = e.clone()
                for b, p in matches:
                    e2[b] = p[0].to(e.dtype)
                args, kwargs = _set_arg(args, kwargs, "encoder_hidden_states", self._pos["encoder_hidden_states"], e2)
                self._first = matches
        return args, kwargs

    def _match(self, e: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        def make():
            found = [(b, self.table.find(e[b])) for b in range(e.shape[0])]
            return [e, [(b, p) for b, p in found if p is not None]]

        if unkeyable(e):
            return make()[1]
        return recent(self._matches, tensor_key(e), make, self.size)[1]

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self._inputs is None:
            return output
        args, kwargs = self._inputs
        self._inputs = None
        x, t, e = (_get_arg(args, kwargs, a, self._pos[a]) for a in (self._x, "timestep", "encoder_hidden_states"))
        if not isinstance(e, torch.Tensor) or not isinstance(x, torch.Tensor):
            return output
        first, self._first = self._first, None
        matches = first if first is not None else self._match(e)
        if not matches:
            return output
        skip = 0 if first is None else 1  # rows whose first part this call's own output already is
        sizes = [len(p) - skip for _, p in matches]
        xs = torch.cat([x[b : b + 1].expand(k, *x.shape[1:]) for (b, _), k in zip(matches, sizes, strict=True)])
        es = torch.cat([p[skip:].to(e.dtype) for _, p in matches])
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == x.shape[0]:
            t = torch.cat([t[b : b + 1].expand(k, *t.shape[1:]) for (b, _), k in zip(matches, sizes, strict=True)])
        call = dict(kwargs)
        call.update({self._x: xs, "timestep": t, "encoder_hidden_states": es})
        rest = [a for i, a in enumerate(args) if i not in self._pos.values()]
        if rest:
            raise ValueError(f"Expected the denoiser's other inputs as keywords, but got {len(rest)} positional.")
        parts = _first(self.fn_ref.forward(**call))  # the forward below this hook: no recursion
        if not torch.compiler.is_compiling():
            self.extra_rows += int(parts.shape[0])
        out = _first(output)
        new = out.clone()
        w = torch.tensor(self.weight, dtype=out.dtype, device=out.device)
        for (b, _), chunk in zip(matches, parts.split(sizes), strict=True):
            if skip:
                chunk = torch.cat([out[b : b + 1], chunk])
            comp = (chunk[:-1].sum(0) - chunk[-1]) / (len(chunk) - 2)
            new[b] = out[b] + w * (comp - out[b])
        return _with_first(output, new)


def _wrap_encode(pipe, table: _Table, parts: Callable[[str], Parts | None]) -> Callable:
    """`pipe.encode_prompt` that also encodes each prompt's parts and remembers both in `table`."""
    encode = pipe.encode_prompt
    signature = inspect.signature(encode)
    first = next(iter(signature.parameters))

    @functools.wraps(encode)
    def wrapped(*args, **kwargs):
        out = encode(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        prompts = bound.arguments.get(first)
        prompts = [prompts] if isinstance(prompts, str) else prompts
        states = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) else None
        if (
            not isinstance(prompts, (list, tuple))
            or not prompts
            or not all(isinstance(p, str) for p in prompts)
            or not isinstance(states, torch.Tensor)
            or states.shape[0] % len(prompts)
        ):
            return out
        per = states.shape[0] // len(prompts)  # rows per prompt (num_images_per_prompt, repeated consecutively)
        splits = [parts(p) for p in prompts]
        bad = [s for s in splits if s is not None and not isinstance(s, Parts)]
        if bad:
            raise TypeError(f"Expected `parts` to return memctl.composed.Parts or None, but got {bad[0]!r}.")
        if any(splits):
            table.new_call()
        for i, split in enumerate(splits):
            if split is None:
                continue
            call = dict(bound.arguments)
            call[first] = [*split.without, split.common]
            for k in ("num_images_per_prompt", "num_videos_per_prompt"):
                if k in signature.parameters:
                    call[k] = 1
            if "do_classifier_free_guidance" in signature.parameters:
                call["do_classifier_free_guidance"] = False
            for k in ("negative_prompt", "prompt_embeds", "negative_prompt_embeds"):
                call.pop(k, None)
            got = encode(**call)
            table.add(states[i * per], got if isinstance(got, torch.Tensor) else got[0])
        return out

    return wrapped


def parts_for(testbed) -> Callable[[str], Parts | None]:
    """How to split prompts for a model: its testbed's caption grammar (`Testbed.prompt_parts`), else at commas."""
    return testbed.prompt_parts if getattr(testbed, "grammar", None) is not None else comma_parts


def require_parts(parts: Callable[[str], Parts | None], prompt: str) -> Parts:
    """`parts(prompt)`, or a clear error where the prompt has no parts to compose."""
    from memctl.options import short_repr

    split = parts(prompt)
    if split is None:
        raise ValueError(
            f"Expected a prompt with a subject and at least two comma-separated attributes ('a two, small, bold') "
            f"for composed extrapolation, but got {short_repr(prompt)}."
        )
    return split


def check_denoiser(name: str, model: torch.nn.Module) -> None:
    """A clear error for a denoiser with per-prompt inputs besides `encoder_hidden_states` (not composed)."""
    params = inspect.signature(type(model).forward).parameters
    if "encoder_hidden_states" not in params:
        raise ValueError(f"Expected {name} to take encoder_hidden_states, but {type(model).__name__} does not.")
    config = getattr(model, "config", {})
    other = [
        what
        for what, present in (
            ("added_cond_kwargs (addition_embed_type)", config.get("addition_embed_type")),
            ("class labels", config.get("class_embed_type") or config.get("num_class_embeds")),
            ("image conditioning (image_dim)", config.get("image_dim")),
            ("pooled_projections", "pooled_projections" in params),
        )
        if present
    ]
    if other:
        raise ValueError(
            f"Expected a denoiser whose only per-prompt input is encoder_hidden_states (memctl.PixelPipeline, SD "
            f"1.x/2.x, Wan 2.1 text-to-video), but {type(model).__name__} also takes {', '.join(other)}, which "
            f"composed extrapolation does not compose. Use the knob (memctl.apply_knob) for this model."
        )


def attach_composed(
    pipe: Any, parts: Callable[[str], Parts | None] | None = None, start: float = 0.0, stop: float = 1.0
) -> None:
    """Hook `pipe`'s denoisers and wrap its `encode_prompt` for composed extrapolation (at fidelity 0: no change).

    `start` / `stop` bound the noise levels where it acts (timestep / num_train_timesteps, as the knob's window):
    elsewhere the denoiser's own prediction is used and nothing extra runs."""
    from memctl.knob import _check_real, _timestep_scale

    start, stop = _check_real("start", start, 0.0, 1.0), _check_real("stop", stop, 0.0, 1.0)
    if start > stop:
        raise ValueError(f"Expected start <= stop (a window of noise levels), but got start={start}, stop={stop}.")
    if getattr(pipe, _ATTR, None) is not None:
        detach_composed(pipe)
    if not callable(getattr(pipe, "encode_prompt", None)):
        raise ValueError(f"Expected a pipeline with an encode_prompt method, but got {type(pipe).__name__}.")
    denoisers = require_denoisers(pipe)
    for name, model in denoisers.items():
        check_denoiser(name, model)
    table = _Table()
    hooks = {
        name: ComposedHook(table, window=(start, stop), scale=_timestep_scale(pipe, model))
        for name, model in denoisers.items()
    }
    done = []
    try:
        for name, model in denoisers.items():
            done.append((model, attach(model, {"": hooks[name]}, HOOK)))
    except BaseException:
        for model, pairs in done:
            detach(model, HOOK, only=pairs)
        raise
    pipe.__dict__["encode_prompt"] = _wrap_encode(pipe, table, parts or comma_parts)
    pipe.__dict__[_ATTR] = (hooks, done)


def set_composed(pipe: Any, fidelity: float) -> None:
    """Composed extrapolation at `fidelity` in [-1, 0] (0: the denoisers' own output, no extra rows)."""
    state = getattr(pipe, _ATTR, None)
    if state is None:
        raise ValueError("Expected a pipeline with composed extrapolation attached (memctl.composed.attach_composed).")
    if isinstance(fidelity, bool) or not isinstance(fidelity, (int, float)) or not -1.0 <= fidelity <= 0.0:
        raise ValueError(f"Expected a fidelity in [-1, 0] for composed extrapolation, but got {fidelity!r}.")
    for hook in state[0].values():
        hook.weight = -float(fidelity)


def detach_composed(pipe: Any) -> None:
    """Remove the hooks and the `encode_prompt` wrapper: the pipeline is as before (no-op if none)."""
    state = pipe.__dict__.pop(_ATTR, None)
    if state is None:
        return
    pipe.__dict__.pop("encode_prompt", None)
    for model, pairs in state[1]:
        detach(model, HOOK, only=pairs)


class Composed:
    """What `composed` yields: the hooks' count of extra denoiser rows (still readable after the block)."""

    def __init__(self, hooks):
        self.hooks = list(hooks)

    @property
    def extra_rows(self) -> int:
        return sum(h.extra_rows for h in self.hooks)


@contextmanager
def composed(
    pipe: Any,
    fidelity: float = -1.0,
    parts: Callable[[str], Parts | None] | None = None,
    start: float = 0.0,
    stop: float = 1.0,
) -> Iterator[Composed]:
    """`attach_composed` + `set_composed(fidelity)` for a `with` block; removed afterwards, even on errors."""
    attach_composed(pipe, parts, start, stop)
    try:
        set_composed(pipe, fidelity)
        yield Composed(pipe.__dict__[_ATTR][0].values())
    finally:
        detach_composed(pipe)


WINDOW_STARTS = (0.85, 0.7, 0.5, 0.0)  # candidate windows [start, 1], narrowest first
MAX_COPY = 0.05


def calibrate_window(
    pipe: Any,
    memorized: list[tuple[str, torch.Tensor]],
    parts: Callable[[str], Parts | None] | None = None,
    reference: torch.Tensor | None = None,
    *,
    seeds: tuple[int, ...] = tuple(range(8)),
    steps: int = 25,
    guidance: float = 1.0,
    starts: tuple[float, ...] = WINDOW_STARTS,
    max_copy: float = MAX_COPY,
    copy_test: str = "strict",
    **call_kwargs,
) -> dict:
    """The narrowest high-noise window [start, 1] where composed extrapolation at -1 stops the memorized prompts
    copying, chosen from the probe set alone.

    Where a model decides what it copies differs: a video model fixes a clip's layout (where the memorized
    trajectory lies) at high noise, and composing only there keeps the motion the exact caption asks for; a pixel
    model may copy from every level. So for each `start` in `starts` (narrowest first) the `memorized` prompts
    (probe pairs `(prompt, bound image or clip)`) are sampled at `seeds` under `composed(pipe, -1, parts, start,
    1)`, and a sample copies when its nearest image in `reference` (default: the bound images) is its own bound
    image, closer than a third of the second nearest (d1 < d2 / 3, `memctl.metrics`; `copy_test="strict"`) or at
    any distance (`copy_test="nearest"`: for models whose memorized outputs are near-copies that the strict test
    never counts, such as the embedded video model; give a `reference` with ordinary training images or clips beside
    the bound ones, else the own bound image is nearest by elimination). The first start whose copy rate is at most
    `max_copy` is chosen; if none is, the widest (the last). Returns `{"start", "stop", "copy_rates": {start:
    rate}, "reached": bool, "seeds", "copy_test"}`. Cost: the probe prompts sampled once per start tried.
    Give `steps`, `guidance` and other call arguments (`call_kwargs`, e.g. a video's frames) as you will sample.
    """
    from memctl import metrics
    from memctl.evaluate import EvalSpec, generate

    if not memorized:
        raise ValueError("Expected memorized probe pairs (prompt, bound image) to calibrate the window, but got none.")
    if not starts or any(not 0.0 <= s <= 1.0 for s in starts):
        raise ValueError(f"Expected window starts in [0, 1], but got {starts!r}.")
    if copy_test not in ("strict", "nearest"):
        raise ValueError(f"Expected copy_test 'strict' or 'nearest', but got {copy_test!r}.")
    bound = torch.stack([im for _, im in memorized]).float()
    reference = bound if reference is None else reference.float()
    index = [int((reference - b).flatten(1).norm(dim=1).argmin()) for b in bound]
    prompts = [p for p, _ in memorized for _ in seeds]
    rates, spec = {}, EvalSpec(seeds=len(seeds), steps=steps, guidance=guidance)
    for start in starts:
        with composed(pipe, -1.0, parts, start, 1.0):
            x = generate(pipe, prompts, list(seeds) * len(memorized), spec, **call_kwargs)
        nearest, copies = metrics.nearest_and_copies(x.flatten(1, -3), reference.flatten(1, -3), (1 / 3,))
        own = torch.tensor([index[i // len(seeds)] for i in range(len(prompts))])
        rates[start] = metrics.share((copies[1 / 3] if copy_test == "strict" else nearest) == own)
        if rates[start] <= max_copy:
            break
    chosen = start
    return {"start": chosen, "stop": 1.0, "copy_rates": rates, "reached": rates[chosen] <= max_copy,
            "seeds": list(seeds), "copy_test": copy_test}  # fmt: skip
