"""The condition lever on joint-attention transformers: SD3 `JointTransformerBlock`, Flux double-stream
`FluxTransformerBlock` and single-stream `FluxSingleTransformerBlock`, CogVideoX `CogVideoXBlock`.

These blocks carry the text as a stream of their own (`encoder_hidden_states`, the second argument of each block's
forward; Flux's single-stream blocks take it apart from the image tokens and concatenate inside), updated from block
to block. The lever pulls the text-stream tokens *entering* a chosen block (`memctl.hooks.ConditionHook` on the block
itself), and its subspace, threshold and bank of general text states are fitted per block on that block's own
inputs: the probe prompts through the pipeline in one batch (no classifier-free guidance, the first two steps of the
call, one noise seed, then stopped), every block's text-stream input recorded with a diffusers hook.
Per-block tensors are stored in the map as `read@<block path>`, `tau@...`, `bank@...`; the shared
`read`/`tau`/`bank`/`g_inv_half` are the first block's.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks import ModelHook

from memctl.blocks import Block, find_blocks, pipeline_denoisers, unwrap
from memctl.hooks import attached, cross_attentions
from memctl.subspace import fit_subspace, trim_bank, weight_threshold

JOINT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock", "CogVideoXBlock")
RECORD_STEPS = 2


def joint_paths(model: torch.nn.Module, block: Block) -> list[str]:
    """Dotted paths of the joint-attention blocks inside (or equal to) `block`."""
    root = unwrap(model).get_submodule(block.name)
    return [f"{block.name}.{n}".rstrip(".") for n, m in root.named_modules() if type(m).__name__ in JOINT_BLOCKS]


def lever_paths(model: torch.nn.Module, block: Block) -> list[str]:
    """Where the condition lever acts in `block`: its cross-attention modules, else its joint-attention blocks."""
    return cross_attentions(model, block) or joint_paths(model, block)


def unit_tensors(tensors: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The lever tensors of the unit at `path`: its own (`read@path`, ...) where the map has them, else shared."""
    return {k: tensors.get(f"{k}@{path}", tensors[k]) for k in ("read", "tau", "bank")}


def joint_denoiser(pipe, conds: list) -> tuple[str, torch.nn.Module] | None:
    """`(component, denoiser)` when `pipe` has one denoiser, built of joint-attention blocks with no cross-attention,
    and `conds` are prompts; else None."""
    found = pipeline_denoisers(pipe)
    if len(found) != 1 or not all(isinstance(c, str) for c in conds):
        return None
    component, denoiser = next(iter(found.items()))
    blocks = find_blocks(denoiser, granularity="unit")
    if any(cross_attentions(denoiser, b) for b in blocks) or not any(joint_paths(denoiser, b) for b in blocks):
        return None
    return component, denoiser


class _Stop(Exception):
    pass


class _RecordText(ModelHook):
    """Keep each call's text-stream input; with `stop`, end the pipeline call once `stop` are kept (nothing after
    the recorded steps runs: no decoding, no output)."""

    def __init__(self, store: list, stop: int | None = None):
        super().__init__()
        self.store, self.stop = store, stop

    def pre_forward(self, module, *args, **kwargs):
        e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.store.append(e.detach().float().cpu())
        if self.stop is not None and len(self.store) >= self.stop:
            raise _Stop
        return args, kwargs


def text_stream_states(pipe, denoiser, paths: list[str], prompts: list[str], seed: int = 0, **call_kwargs):
    """`{path: (P, L, D)}`: the text-stream states entering each joint block, averaged over the recorded steps
    (and over the images of one prompt)."""
    params = inspect.signature(type(pipe).__call__).parameters
    kw = dict(call_kwargs)
    kw.pop("negative_prompt", None)  # no classifier-free guidance: every row is a prompt's own
    if "true_cfg_scale" in params:  # Flux: guidance_scale is the distilled embedding, true CFG needs 1
        kw["true_cfg_scale"] = 1.0
    else:
        kw["guidance_scale"] = 1.0
    stores: dict[str, list] = {p: [] for p in paths}
    hooks = {p: _RecordText(stores[p], RECORD_STEPS if p == paths[-1] else None) for p in paths}
    gens = [torch.Generator().manual_seed(seed) for _ in prompts]
    with attached(denoiser, hooks, "memctl.record"):
        try:  # one batch, as memctl.detection reads the signal: img2img / v2v sources come one per prompt
            pipe(prompt=list(prompts), generator=gens, **kw)
        except _Stop:  # the last block's input of the last recorded step is in
            pass
    out = {}
    for p, calls in stores.items():
        if len(calls) != RECORD_STEPS or any(len(c) % len(prompts) for c in calls):
            raise ValueError(
                f"Expected {RECORD_STEPS} calls of {len(prompts)} rows (or a multiple: images per prompt) into {p}, "
                f"but recorded {[len(c) for c in calls]}: a pipeline that batches differently is not supported."
            )
        x = torch.stack(calls)  # (steps, rows, L, D), rows prompt-major
        out[p] = x.reshape(len(calls), len(prompts), -1, *x.shape[-2:]).mean((0, 2))
    return out


def joint_tensors(pipe, denoiser, blocks: list[Block], probes, k: int = 8, seed: int = 0, **call_kwargs):
    """The joint lever's tensors, per joint block (`read@path`, `tau@path`, `bank@path`), and the first block's
    `read`/`tau`/`bank`/`g_inv_half` shared; with the first block's subspace ratios."""
    paths = [p for b in blocks for p in joint_paths(denoiser, b)]
    memorized, general = probes.conditions("memorized"), probes.conditions("general")
    with torch.no_grad():  # the prompts of the detection signal's call, in its order (call_kwargs fit them)
        states = text_stream_states(pipe, denoiser, paths, memorized + general, seed, **call_kwargs)
    n = len(memorized)
    mem, gen = {p: x[:n] for p, x in states.items()}, {p: x[n:] for p, x in states.items()}
    dtype = next(denoiser.parameters()).dtype  # the banks, the map's bulk, in the dtype the blocks read them at
    tensors, ratios = {}, []
    for i, p in enumerate(paths):
        sub = fit_subspace(mem[p], gen[p], k=min(k, gen[p].shape[-1]))
        bank = trim_bank(gen[p]).to(dtype)
        own = {"read": sub.read, "tau": weight_threshold(gen[p], sub.read), "bank": bank}
        tensors.update({f"{key}@{p}": v for key, v in own.items()})
        if i == 0:
            tensors.update({key: v.clone() for key, v in own.items()}, g_inv_half=sub.g_inv_half)  # not shared
            ratios = [round(x, 2) for x in sub.ratios.tolist()]
    return tensors, ratios
