"""Find the residual blocks of a diffusers denoiser, addressed by their dotted `named_modules()` path.

    >>> blocks = find_blocks(pipe.unet)
    >>> [(b.name, b.kind, b.stage) for b in blocks][:2]
    [('down_blocks.0.resnets.0', 'resnet', 'down'), ('down_blocks.0.attentions.0', 'attention', 'down')]

Blocks are recognised by class name inside known containers (as tomesd does); no forward is re-implemented.
Each `Block` says how its residual update is read, so that `memctl.hooks` can scale it:

- `mode="branch"`: the module at `target` outputs the residual branch itself (a resnet's `conv2`, a
  `Transformer2DModel`'s `proj_out`, an `Attention`'s `to_out.0`); scaling its output scales the update.
- `mode="delta"`: the block at `target` returns `input + update`; the update is `output - input`, read from the
  tuple element `output_index` (and, for two-stream blocks such as SD3 and Flux, also `encoder_index`).

A *stage* groups units (a UNet's `down_blocks.1`, `mid_block`, or a third of a transformer stack,
`transformer_blocks[0:4]`); scaling a stage scales every unit in it by the same factor.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import torch

__all__ = ["Block", "DENOISER_ATTRS", "find_blocks", "pipeline_denoisers", "require_denoisers", "unwrap"]

DENOISER_ATTRS = ("unet", "transformer", "transformer_2")  # transformer_2: Wan 2.2's second expert

# Residual units inside a UNet down/mid/up block: container attribute -> (kind, rank in forward order).
_UNET_CONTAINERS = {
    "resnets": ("resnet", 0),
    "temp_convs": ("temporal", 1),
    "attentions": ("attention", 2),
    "temp_attentions": ("temporal", 3),
    "motion_modules": ("motion", 4),
}
# Units whose residual branch ends in one submodule: class name -> that submodule's path.
_BRANCH_ENDS = {
    "ResnetBlock2D": "conv2",
    "ResnetBlockCondNorm2D": "conv2",
    "Transformer2DModel": "proj_out",
    "TransformerTemporalModel": "proj_out",
    "AnimateDiffTransformer3D": "proj_out",
    "TemporalConvLayer": "conv4",
    "Attention": "to_out.0",  # only with residual_connection=True (UNet2DModel's attention blocks)
}
# Transformer stacks: container attribute -> stage label.
_STACKS = {"transformer_blocks": "blocks", "single_transformer_blocks": "single", "blocks": "blocks"}
# Transformer blocks returning `input + update`: class name -> (hidden-state element, encoder-state element).
# Mirrors diffusers' private TransformerBlockRegistry (consulted as a fallback for classes not listed here).
_STREAMS = {
    "BasicTransformerBlock": (0, None),
    "JointTransformerBlock": (1, 0),  # SD3: (encoder, hidden); the last block's encoder output may be None
    "FluxTransformerBlock": (1, 0),
    "FluxSingleTransformerBlock": (1, 0),
    "CogVideoXBlock": (0, 1),
    "WanTransformerBlock": (0, None),
}


@dataclass(frozen=True)
class Block:
    """One residual unit (or a stage grouping units) of a denoiser.

    >>> b = Block("mid_block.resnets.0", "resnet", "mid", 3, target="mid_block.resnets.0.conv2", mode="branch")
    >>> b.leaves() == (b,)
    True
    """

    name: str  # dotted path from named_modules() (a stage of a transformer stack: "transformer_blocks[0:4]")
    kind: str  # "resnet" | "attention" | "transformer" | "motion" | "temporal" | "stage" | "custom"
    stage: str  # "in" | "down" | "mid" | "up" for UNets; "blocks" | "single" (Flux) ... for transformer stacks
    index: int  # position in forward (depth) order
    target: str = ""  # module whose forward is hooked; defaults to `name`
    mode: str = "delta"  # "branch": output is the update; "delta": output - input is the update
    output_index: int = 0  # delta mode: tuple element holding the hidden state (ignored for a tensor output)
    encoder_index: int | None = None  # delta mode: tuple element holding the encoder (text) stream, scaled alike
    input_arg: str = "hidden_states"  # delta mode: forward argument holding the block's input
    encoder_arg: str = "encoder_hidden_states"
    units: tuple[Block, ...] = ()  # a stage: the units it scales together

    def __post_init__(self):
        if not self.target and not self.units:
            object.__setattr__(self, "target", self.name)
        if self.mode not in ("branch", "delta"):
            raise ValueError(f"Expected mode 'branch' or 'delta', but got {self.mode!r}.")

    def leaves(self) -> tuple[Block, ...]:
        """The units to hook: a stage's members, or the block itself."""
        return self.units or (self,)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a `torch.compile` wrapper (hooks go on the unwrapped module)."""
    return getattr(model, "_orig_mod", model)


def pipeline_denoisers(pipe) -> dict[str, torch.nn.Module]:
    """`{component: denoiser}` a pipeline holds (`unet`, `transformer`, `transformer_2`); empty if none."""
    return {c: getattr(pipe, c) for c in DENOISER_ATTRS if isinstance(getattr(pipe, c, None), torch.nn.Module)}


def require_denoisers(pipe) -> dict[str, torch.nn.Module]:
    """`pipeline_denoisers(pipe)`, or a ValueError saying what came when it holds none: the one such check."""
    found = pipeline_denoisers(pipe)
    if not found:
        raise ValueError(f"Expected a pipeline with a `unet` or `transformer`, but got {type(pipe).__name__}.")
    return found


def find_blocks(model: torch.nn.Module, granularity: str = "unit", names: list[str] | None = None) -> list[Block]:
    """Residual blocks of `model` in forward order, as units or stages, or the blocks named in `names`.

    >>> [b.name for b in find_blocks(unet, "stage")]
    ['down_blocks.0', 'down_blocks.1', 'mid_block', 'up_blocks.0', 'up_blocks.1']
    >>> [b.kind for b in find_blocks(toy, names=["layers.1"])]  # an unknown architecture: name blocks by hand
    ['custom']
    """
    if granularity not in ("unit", "stage"):
        raise ValueError(f"Expected granularity 'unit' or 'stage', but got {granularity!r}.")
    model = unwrap(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected a torch.nn.Module denoiser (e.g. pipe.unet), but got {type(model).__name__}.")
    units = _find_units(model)
    if names is not None:
        return _resolve(model, units, list(names))
    if not units:
        raise ValueError(_no_blocks_message(model))
    return units if granularity == "unit" else _stages(units)


def _find_units(model: torch.nn.Module) -> list[Block]:
    found: list[Block] = []
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        found = _unet_units(model)
    for container, stage in _STACKS.items():
        stack = getattr(model, container, None)
        if isinstance(stack, torch.nn.ModuleList):
            if container == "transformer_blocks" and hasattr(model, "single_transformer_blocks"):
                stage = "double"
            found += _stack_units(stack, container, stage, start=len(found))
    return found


def _unet_units(model: torch.nn.Module) -> list[Block]:
    found: list[tuple[tuple[int, int, int], Block | None]] = []  # ((group, position, rank), unit)
    if getattr(model, "transformer_in", None) is not None:  # UNet3DConditionModel: temporal attention after conv_in
        found.append(((0, 0, 0), _branch_unit("transformer_in", model.transformer_in, "temporal", "in")))
    groups = [("down", f"down_blocks.{i}", blk) for i, blk in enumerate(model.down_blocks)]
    if getattr(model, "mid_block", None) is not None:
        groups.append(("mid", "mid_block", model.mid_block))
    groups += [("up", f"up_blocks.{i}", blk) for i, blk in enumerate(model.up_blocks)]
    for g, (stage, path, blk) in enumerate(groups, start=1):
        for attr, (kind, rank) in _UNET_CONTAINERS.items():
            for j, unit in enumerate(getattr(blk, attr, None) or []):
                found.append(((g, j, rank), _branch_unit(f"{path}.{attr}.{j}", unit, kind, stage)))
    ordered = [unit for _, unit in sorted(found, key=lambda f: f[0]) if unit is not None]
    return [replace(unit, index=i) for i, unit in enumerate(ordered)]


def _branch_unit(name: str, module: torch.nn.Module, kind: str, stage: str) -> Block | None:
    end = _BRANCH_ENDS.get(type(module).__name__)
    if end is None or (end == "to_out.0" and not getattr(module, "residual_connection", False)):
        return None
    try:
        module.get_submodule(end)
    except AttributeError:
        return None
    return Block(name, kind, stage, 0, target=f"{name}.{end}", mode="branch")


def _stack_units(stack: torch.nn.ModuleList, container: str, stage: str, start: int) -> list[Block]:
    units = []
    for k, block in enumerate(stack):
        streams = _streams(block)
        if streams is not None:
            units.append(Block(f"{container}.{k}", "transformer", stage, start + len(units), mode="delta", **streams))
    return units


def _streams(module: torch.nn.Module) -> dict | None:
    """How a transformer block's output and input hold its streams (Block fields), or None for an unknown class."""
    known = _STREAMS.get(type(module).__name__)
    if known is not None:
        return {"output_index": known[0], "encoder_index": known[1]}
    try:  # diffusers' private registry knows newer families; tolerate its absence or renaming
        from diffusers.hooks._helpers import TransformerBlockRegistry

        meta = TransformerBlockRegistry.get(type(module))
        return {
            "output_index": meta.return_hidden_states_index or 0,
            "encoder_index": meta.return_encoder_hidden_states_index,
            "input_arg": meta.hidden_states_argument_name,
            "encoder_arg": meta.encoder_hidden_states_argument_name,
        }
    except Exception:
        return None


def _stages(units: list[Block]) -> list[Block]:
    """Group units: a UNet's down/up block index, mid block, transformer_in; thirds of each transformer stack."""
    groups: dict[str, list[Block]] = {}
    for u in units:
        if u.kind == "transformer":
            key = u.name.rsplit(".", 1)[0]
        elif u.stage == "in":
            key = u.name
        else:
            key = ".".join(u.name.split(".")[: 1 if u.stage == "mid" else 2])
        groups.setdefault(key, []).append(u)
    stages: list[Block] = []
    for key, members in groups.items():
        if members[0].kind != "transformer":
            stages.append(Block(key, "stage", members[0].stage, len(stages), units=tuple(members)))
            continue
        n = len(members)
        for chunk in torch.arange(n).tensor_split(min(3, n)):
            group = tuple(members[int(chunk[0]) : int(chunk[-1]) + 1])
            lo, hi = group[0].name.rsplit(".", 1)[1], int(group[-1].name.rsplit(".", 1)[1]) + 1
            stages.append(Block(f"{key}[{lo}:{hi}]", "stage", group[0].stage, len(stages), units=group))
    return stages


def _resolve(model: torch.nn.Module, units: list[Block], names: list[str]) -> list[Block]:
    known = {b.name: b for b in units + (_stages(units) if units else [])}
    modules = dict(model.named_modules())
    blocks = []
    for i, name in enumerate(names):
        if name in known:
            blocks.append(known[name])
        elif name in modules and name:
            blocks.append(Block(name, "custom", "custom", i, mode="delta", **(_streams(modules[name]) or {})))
        else:
            close = difflib.get_close_matches(name, list(known) + [m for m in modules if m], n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise ValueError(
                f"Expected block names from {type(model).__name__}.named_modules() or find_blocks(), but got "
                f"{name!r}, which is not in this model.{hint}"
            )
    return blocks


def _no_blocks_message(model: torch.nn.Module) -> str:
    lists = [n for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList)]
    return (
        f"Expected a denoiser with residual blocks memctl recognises, but got {type(model).__name__}, where none "
        f"were found. Looked for UNet containers down_blocks / mid_block / up_blocks holding "
        f"{', '.join(_UNET_CONTAINERS)} of classes {', '.join(_BRANCH_ENDS)}, and transformer stacks "
        f"{', '.join(_STACKS)} of classes {', '.join(_STREAMS)} (or blocks in diffusers' TransformerBlockRegistry). "
        f"Pass the residual blocks by hand: find_blocks(model, names=[...]) with dotted names from "
        f"model.named_modules(){' — its module lists: ' + ', '.join(lists) if lists else ''}."
    )
