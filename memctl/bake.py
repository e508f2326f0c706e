"""Bake the fidelity knob into the weights: a hook-free copy of a pipeline at one fidelity <= 0.

    >>> baked = bake(pipe, bmap, -1.0, out_dir)   # a new folder, which any diffusers install loads
    >>> memctl.list_hooks(baked.unet), sorted(p.name for p in out_dir.iterdir())[:2]
    ([], ['bake.json', 'denoiser.safetensors'])

Condition lever (maps made by `probe(method="condition" | "prompt")`): each selected cross-attention reads
`M e` instead of `e`, folded into its key and value projections (`W' = W M` for `to_k` and `to_v`; the same M for
both since the knob pulls their common input). M is the closed-form least-squares edit of UCE (Gandikota et al.
2024, "Unified Concept Editing in Diffusion Models"): over token states e of memorized and general conditionings,

    M = argmin  Σ_mem ‖M e − ẽ‖² + λ Σ_gen ‖M e − e‖² + ε ‖M − I‖²
      = (Σ_mem ẽ eᵀ + λ Σ_gen e eᵀ + ε I) (Σ_mem e eᵀ + λ Σ_gen e eᵀ + ε I)⁻¹,

where ẽ is the knob's pull of e in that unit (`memctl.subspace.pull_to_general` with α = 1 − s, s the unit's
factor from `knob_law`). The general states are the map's `bank` (the general conditionings it pulls toward; a
bank entry's pull is itself). The memorized states are the text states of `prompts` when given (e.g. the probes'
memorized prompts, or those `memctl.detect` flags); without prompts, every bank token shifted along one of the
map's memorized directions (`G read_j`, G the general states' second moment) to weight 0.9, a stand-in for
tokens the map would pull. The pull depends on each token (its weight and nearest general conditioning), a
linear edit cannot; the edit is its best linear fit on these states. The ridge ε (1e-3 of the mean eigenvalue)
keeps directions no state covers as they are. Measured on the shipped testbeds at fidelity -1 (8 seeds, 25
steps): fit on the canary prompts, the baked copy rates equal the hooked knob's at every exposure and novel-valid
is 83% / 87% against the knob's 89% / 88% (digits-s0 / -s1); with the stand-ins copies fall as far but novel-valid
is only 29% / 35%. Give the memorized prompts when you have them.

Residual lever: a unit whose residual branch ends in one linear layer (a resnet's `conv2`, a UNet attention's
`proj_out`, an `Attention`'s `to_out.0`) gets that layer's weight and bias times its factor, which is exact. A
transformer block returning `input + update` (DiT, SD3, Flux, Wan) has no such layer: an error says so. Condition maps
bake where the lever acts on cross-attentions (UNets, Wan's `attn2`); a joint-attention condition map (SD3, Flux,
CogVideoX) is refused with an error, since its pull acts before a timestep-modulated norm.

The knob's factors depend on the noise level (per-level maps); one set of weights cannot, so the bake uses each
unit's factor averaged over the map's levels (for the condition lever that is also the least-squares optimum over
the levels, the pull being linear in α). Fidelity > 0 is memorization *guidance*, a second denoiser pass per step,
not a weight edit: not bakeable.

The folder is a standard diffusers one of the nearest stock class (a `memctl` custom pipeline is saved as its
diffusers base class, e.g. `StableDiffusionPipeline`; a `PixelPipeline` as itself, which `memctl.load_pipeline`
loads), plus `denoiser.safetensors` (the denoiser's state dict in one file, for tools that load checkpoints) and
`bake.json`; the provenance (source and baked fingerprints, map sha256, fidelity) is also in the denoiser's
`config.json` under `_memctl_bake`, which diffusers ignores when loading. Written to a temporary folder beside
OUT and renamed into place: an error leaves nothing behind.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from memctl.atomic import file_mode, make_parent
from memctl.blockmap import BlockMap, fingerprint
from memctl.blocks import find_blocks, unwrap
from memctl.hooks import cross_attentions, list_hooks
from memctl.knob import _check_real, _pairs, knob_law
from memctl.pipeline import PixelPipeline
from memctl.subspace import pull_to_general

__all__ = ["bake", "BAKE_KEY", "condition_edit", "fit_prompts", "map_sha256", "matches", "prompts_sha256"]

BAKE_KEY = "_memctl_bake"  # key of the provenance in the baked denoiser's config.json
_FORMAT, _VERSION = "memctl.bake", 1
_SYNTHETIC_WEIGHT = 0.9  # memorization weight of the stand-in memorized tokens (no prompts given)


def _check_fidelity(fidelity: Any) -> float:
    if isinstance(fidelity, bool) or not isinstance(fidelity, numbers.Real) or not math.isfinite(fidelity):
        raise ValueError(f"Expected a fidelity in [-1, 0], but got {fidelity!r}.")
    if fidelity > 0:
        raise ValueError(
            f"Expected a fidelity in [-1, 0] to bake, but got {fidelity}: fidelity > 0 is memorization guidance, a "
            f"second denoiser pass per step, not an edit of the weights. Use the hooked knob (memctl.apply_knob, "
            f"or fidelity= on a memctl pipeline) for it."
        )
    if fidelity < -1:
        raise ValueError(f"Expected a fidelity in [-1, 0], but got {fidelity}.")
    return float(fidelity)


def fit_prompts(bmap: BlockMap, testbed=None, prompts: list[str] | None = None) -> list[str] | None:
    """The memorized prompts a bake of `bmap` fits its edit on: `prompts` if given, else a testbed's canary prompts
    (what its maps are probed with) for a condition map, else None (stand-ins made from the map)."""
    if prompts is None and testbed is not None and bmap.lever == "condition":
        return [c[0] for c in testbed.canaries]
    return prompts


def prompts_sha256(prompts: list[str] | None) -> str | None:
    """The fingerprint of the memorized prompts a bake was fit on (None: stand-ins)."""
    return None if prompts is None else hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def matches(folder: str | os.PathLike, expected: dict) -> bool:
    """Whether `folder` holds a bake whose provenance (`bake.json`) has every item of `expected`."""
    path = Path(folder) / "bake.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and all(info.get(k) == v for k, v in expected.items())


def unit_factors(bmap: BlockMap, fidelity: float, strength: float = 1.0) -> torch.Tensor:
    """Each block's knob factor `(n_blocks,)` at `fidelity`, averaged over the map's noise levels."""
    scale = bmap.lever_config.knob_scale or float(bmap.scores.abs().max() if bmap.n_blocks else 1.0)
    floor = 1.0 - bmap.lever_config.pull_max if bmap.lever == "condition" else 0.0
    return knob_law(bmap.scores.float(), fidelity, strength, scale, floor).mean(1)


def _memorized_states(tensors: dict[str, torch.Tensor], states: torch.Tensor | None) -> torch.Tensor:
    """`(N, L, D)` memorized conditionings: `states` if given, else bank tokens shifted along the map's directions."""
    if states is not None:
        return states.double()
    bank, read, tau = tensors["bank"].double(), tensors["read"].double(), tensors["tau"].double()
    g_inv_half = tensors["g_inv_half"].double()
    g = torch.linalg.inv(g_inv_half @ g_inv_half)  # (D, D) the general second moment (with the fit's ridge)
    write = g @ read  # (D, k): a shift along column j moves a token's coordinates along read by e_j
    k = read.shape[1]
    size = (tau * _SYNTHETIC_WEIGHT / (1 - _SYNTHETIC_WEIGHT)).sqrt()  # energy for weight 0.9 (a token near 0)
    shifted = [bank + size * sign * write[:, j] for j in range(k) for sign in (1.0, -1.0)]
    return torch.cat(shifted)  # (2k P, L, D)


def condition_edit(
    tensors: dict[str, torch.Tensor],
    alpha: float,
    memorized: torch.Tensor | None = None,
    lam: float = 1.0,
    ridge: float = 1e-3,
) -> torch.Tensor:
    """UCE's closed form `M` `(D, D)`, float64: `M e ≈ pull(e)` on memorized states, `M e ≈ e` on the bank.

    >>> m = condition_edit(condition_map.lever_tensors, 0.0)   # α = 0: nothing pulled, the identity
    >>> torch.allclose(m, torch.eye(m.shape[0], dtype=m.dtype))
    True
    """
    bank = tensors["bank"].double()  # (P, L, D)
    mem = _memorized_states(tensors, memorized)  # (N, L, D)
    read, tau = tensors["read"].double(), tensors["tau"].double()
    # in chunks: the nearest-general search holds (rows, P, L, D) at once, 27 GB for all 2k·P stand-ins at SD's size
    pulled = torch.cat([pull_to_general(m, read, tau, bank, torch.tensor(alpha)) for m in mem.split(8)])
    d = bank.shape[-1]
    e_m, t_m, e_g = mem.reshape(-1, d), pulled.reshape(-1, d), bank.reshape(-1, d)
    cov = e_m.T @ e_m + lam * e_g.T @ e_g  # (D, D)
    eps = ridge * float(cov.diagonal().mean()) * torch.eye(d, dtype=cov.dtype)
    cross = t_m.T @ e_m + lam * e_g.T @ e_g + eps  # Σ ẽ eᵀ
    return torch.linalg.solve(cov + eps, cross.T).T  # cross (cov + eps)⁻¹; cov symmetric


def _linear_end(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """The linear layer (Linear / ConvNd) whose output is `module`'s output."""
    while isinstance(module, torch.nn.Sequential) and len(module):
        module = module[-1]
    if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
        return module
    raise ValueError(
        f"Expected the residual branch of {name!r} to end in a Linear or Conv layer, but it ends in "
        f"{type(module).__name__}: its factor cannot be folded into weights. Use the hooked knob for this map."
    )


@torch.no_grad()
def _scale_layer(layer: torch.nn.Module, s: float) -> None:
    layer.weight.mul_(s)
    if layer.bias is not None:
        layer.bias.mul_(s)


@torch.no_grad()
def _edit_cross_attention(attn: torch.nn.Module, m: torch.Tensor, path: str) -> None:
    if getattr(attn, "norm_cross", None) is not None:
        raise ValueError(
            f"Expected cross-attention {path!r} to project its conditioning directly, but it normalizes it first "
            f"(norm_cross): a linear edit of to_k/to_v would not match the knob. Use the hooked knob for this map."
        )
    for proj in (attn.to_k, attn.to_v):
        w = proj.weight
        proj.weight.copy_((w.double() @ m.to(w.device)).to(w.dtype))


def _bake_denoiser(module, part: BlockMap, fidelity, strength, states, lam) -> list[dict]:
    """Edit `module` in place; returns what was done per block (for bake.json)."""
    factors = unit_factors(part, fidelity, strength)
    tensors = {k: v.detach().cpu() for k, v in part.lever_tensors.items()}
    done, edits = [], {}
    for block, s in zip(find_blocks(module, names=part.names), factors.tolist(), strict=True):
        paths = cross_attentions(module, block) if part.lever == "condition" else []
        if s == 1.0:
            continue
        if paths:
            alpha = 1.0 - s
            if alpha not in edits:
                edits[alpha] = condition_edit(tensors, alpha, states, lam)
            for path in paths:
                _edit_cross_attention(module.get_submodule(path), edits[alpha], path)
            done.append({"block": block.name, "lever": "condition", "factor": s, "pull": alpha, "modules": paths})
            continue
        if part.lever == "condition":
            raise ValueError(
                f"Expected a condition map over cross-attention units (whose to_k/to_v read the prompt's states), but "
                f"{block.name!r} is a joint-attention block (SD3, Flux, CogVideoX): its text tokens pass a "
                f"timestep-modulated norm before their projections, so no weight edit equals the pull. Use the "
                f"hooked knob (memctl.apply_knob) for this map."
            )
        targets = []
        for leaf in block.leaves():
            if leaf.mode != "branch":
                raise ValueError(
                    f"Expected units whose residual branch ends in one layer (UNet resnets and attentions), but "
                    f"{leaf.name!r} is a {leaf.kind} block returning input + update: its factor {s:.3g} cannot be "
                    f"folded into weights exactly. Use the hooked knob (memctl.apply_knob) for this map."
                )
            _scale_layer(_linear_end(module.get_submodule(leaf.target), leaf.name), s)
            targets.append(leaf.target)
        done.append({"block": block.name, "lever": "residual", "factor": s, "modules": targets})
    return done


def map_sha256(bmap: BlockMap) -> str:
    h = hashlib.sha256(json.dumps(bmap.to_dict(), sort_keys=True).encode())
    for k in sorted(bmap.lever_tensors):
        h.update(k.encode() + bmap.lever_tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _stock_class(pipe) -> type:
    """The nearest class of `pipe` a plain diffusers (or memctl, for PixelPipeline) install knows."""
    from diffusers import DiffusionPipeline

    for cls in type(pipe).__mro__:
        if cls is PixelPipeline or (cls.__module__.startswith("diffusers.") and cls is not DiffusionPipeline):
            return cls
    raise ValueError(
        f"Expected a diffusers pipeline class (or a subclass of one), but {type(pipe).__name__} derives from none: "
        f"a baked folder must load without custom code."
    )


def _rebuilt(pipe, component: str, denoiser: torch.nn.Module):
    """A pipeline of the stock class sharing `pipe`'s components, with `denoiser` as `component`."""
    cls = _stock_class(pipe)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in pipe.components.items() if k in params}
    kwargs.update({k: v for k, v in dict(pipe.config).items() if k in params and k not in kwargs})
    kwargs[component] = denoiser
    baked = cls(**kwargs)
    if hasattr(baked, "set_progress_bar_config"):
        baked.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return baked


def _prepare_out(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"Expected OUT to be a new or empty folder, but {out} {'is a file' if not out.is_dir() else 'has files'}."
            f" Remove it or choose another folder."
        )
    make_parent(out, "OUT")
    return out, Path(tempfile.mkdtemp(prefix=f".{out.name}.bake-", dir=out.parent))


def _save(baked, component: str, provenance: dict, out_dir) -> Path:
    from safetensors.torch import save_file

    out, tmp = _prepare_out(out_dir)
    try:
        baked.save_pretrained(tmp, safe_serialization=True)
        config_file = tmp / component / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config[BAKE_KEY] = provenance
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        state = {k: v.detach().contiguous().cpu() for k, v in unwrap(getattr(baked, component)).state_dict().items()}
        save_file(state, tmp / "denoiser.safetensors", metadata={BAKE_KEY: json.dumps(provenance)})
        (tmp / "bake.json").write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, file_mode() | (file_mode() & 0o444) >> 2)  # mkdtemp makes 0700; a folder as umask says
        if out.exists():
            out.rmdir()  # empty (checked): the rename below replaces it
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def bake(
    pipe,
    bmap: BlockMap,
    fidelity: float,
    out_dir: str | os.PathLike | None = None,
    *,
    strength: float = 1.0,
    prompts: list[str] | None = None,
    lam: float = 1.0,
):
    """The knob at `fidelity` (in [-1, 0]) written into a copy of the denoiser; a hook-free pipeline sharing the
    other components with `pipe`, saved to `out_dir` when given (see the module docstring).

    `prompts`: memorized prompts whose text states the condition edit fits (default: stand-ins made from the
    map). `lam`: weight of the general states against the memorized ones. `strength` as in `apply_knob`.
    """
    fidelity = _check_fidelity(fidelity)
    strength = _check_real("strength", strength, 0.0, math.inf)
    lam = _check_real("lam", lam, 0.0, math.inf)
    if not isinstance(bmap, BlockMap):
        raise TypeError(f"Expected a memctl.BlockMap, but got {type(bmap).__name__}.")
    if isinstance(pipe, torch.nn.Module):
        raise ValueError(f"Expected a pipeline, but got the module {type(pipe).__name__}: pass the pipeline.")
    pairs = _pairs(pipe, bmap)
    if len(pairs) != 1:
        raise ValueError(f"Expected a map of one denoiser to bake, but this one covers {[c for c, _ in pairs]}.")
    component, module = pairs[0]
    if list_hooks(module):
        raise ValueError(
            f"Expected a denoiser without memctl hooks, but {component} has {list_hooks(module)[:3]}: call "
            f"memctl.remove_knob(pipe) first (the bake copies the plain weights)."
        )
    part = bmap.select(component)
    part.check_model(module, component)
    if prompts is not None and part.lever != "condition":
        raise ValueError(
            f"Expected prompts only for a condition-lever map (they fit its key/value edit), but this map's lever is "
            f"{part.lever!r}, whose factors are folded into weights without them. Leave prompts out."
        )
    states, memorized = None, None
    if part.lever == "condition":
        memorized = f"{len(prompts)} prompts" if prompts is not None else "stand-ins from the map"
    if prompts is not None:
        from memctl.probe import text_states

        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"Expected prompts to be a non-empty list of str, but got {prompts!r}.")
        with torch.no_grad():
            states = text_states(pipe, list(prompts)).detach().float().cpu()
    baked_module = copy.deepcopy(module)
    done = _bake_denoiser(baked_module, part, fidelity, strength, states, float(lam))
    provenance = {
        "format": _FORMAT,
        "version": _VERSION,
        "fidelity": fidelity,
        "strength": strength,
        "component": component,
        "source_fingerprint": fingerprint(module),
        "baked_fingerprint": fingerprint(baked_module),
        "map_fingerprint": part.fingerprint,
        "map_sha256": map_sha256(bmap),
        "map_method": bmap.method,
        "lever": part.lever,
        "noise_levels": "factors averaged over the map's levels" if part.per_level else "one level",
        "memorized_states": memorized,
        "prompts_sha256": prompts_sha256(prompts),
        "lambda": float(lam),
        "edits": done,
    }
    baked = _rebuilt(pipe, component, baked_module)
    baked._memctl_bake = provenance
    if out_dir is not None:
        _save(baked, component, provenance, out_dir)
    return baked
