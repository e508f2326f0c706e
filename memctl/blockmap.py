"""Block maps: a signed score per block (positive = memorization-heavy, negative = generalization-heavy).

    >>> bmap = BlockMap.from_scores(unet, {"up_blocks.0.resnets.1": 0.8, "mid_block": -0.3})
    >>> bmap.save(path)
    >>> BlockMap.load(path) == bmap
    True

A map records the model it was made for (`fingerprint`: sha256 of the denoiser's config and of a strided sample of
its weights), so using it on another model is an error, not a silent misfit; a dtype cast of the same weights
(fp16, bf16) still matches. Scores may depend on the noise level: `scores` is `(n_blocks, n_levels)` with the
normalized noise levels `levels` (t / num_train_timesteps, 1 = pure noise). Blocks are keyed by `component`, the
pipeline attribute of their denoiser ("unet", "transformer", "transformer_2"), so one map can cover the two experts
of Wan 2.2 (`BlockMap.combine`). Files are safetensors with JSON metadata: no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memctl.atomic import atomic_path
from memctl.blocks import find_blocks, unwrap
from memctl.experts import SEP, for_component, qualifiers
from memctl.fingerprints import _fingerprint_and_sample, _same_up_to_cast, default_component, fingerprint
from memctl.lever_config import KEYS as LEVER_KEYS
from memctl.lever_config import LeverConfig
from memctl.subspace import weight_threshold

__all__ = ["BlockMap", "fingerprint", "default_component"]

_FORMAT, _VERSION = "memctl.blockmap", 1
LEVERS = ("residual", "condition")
_CONDITION_TENSORS = {"read", "tau", "bank", "g_inv_half"}


@dataclass(eq=False)
class BlockMap:
    """Signed per-block scores for one or more denoisers, with the fingerprint of each.

    >>> bmap = BlockMap(["mid_block"], torch.tensor([[0.5]]), None, ["stage"], ["unet"], {"unet": "x-y"})
    >>> bmap.n_blocks, bmap.per_level
    (1, False)
    """

    names: list[str]  # block names, from find_blocks (units, or stages such as "up_blocks.0")
    scores: torch.Tensor  # (n_blocks, n_levels) float32
    levels: torch.Tensor | None  # (n_levels,) ascending noise levels in [0, 1]; None: one score per block
    kinds: list[str]  # per block, Block.kind
    components: list[str]  # per block, the pipeline attribute of its denoiser
    fingerprints: dict[str, str]  # component -> fingerprint(denoiser)
    granularity: str = "unit"  # "unit" | "stage" | "mixed"
    method: str = "manual"  # how the scores were made ("ablation", ...)
    meta: dict = field(default_factory=dict)  # JSON-able probe summary, and the lever's settings (`lever_config`)
    samples: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # component -> weight sample
    lever: str = "residual"  # "residual": scale residual updates; "condition": pull memorized conditioning tokens
    lever_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # e.g. subspace read/write

    def __post_init__(self):
        self.names, self.kinds, self.components = list(self.names), list(self.kinds), list(self.components)
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        n = len(self.names)
        if self.scores.ndim != 2 or self.scores.shape[0] != n or not (len(self.kinds) == len(self.components) == n):
            raise ValueError(
                f"Expected scores of shape (n_blocks, n_levels) with n_blocks = {n} names, kinds and components, "
                f"but got scores {tuple(self.scores.shape)}, {len(self.kinds)} kinds, "
                f"{len(self.components)} components."
            )
        if not torch.isfinite(self.scores).all():
            bad = self.scores[~torch.isfinite(self.scores)][:8].tolist()
            raise ValueError(f"Expected finite scores, but got {bad} in tensor `scores`.")
        if self.levels is not None:
            self.levels = torch.as_tensor(self.levels, dtype=torch.float32).detach().cpu()
            lv = self.levels
            if (
                lv.shape != (self.scores.shape[1],)
                or not torch.isfinite(lv).all()
                or (lv < 0).any()
                or (lv > 1).any()
                or (lv.diff() <= 0).any()
            ):
                raise ValueError(
                    f"Expected {self.scores.shape[1]} ascending noise levels in [0, 1] in tensor `levels`, but got "
                    f"{lv.tolist()[:16]}."
                )
        elif self.scores.shape[1] != 1:
            raise ValueError(f"Expected levels for {self.scores.shape[1]} scores per block, but got None.")
        if self.lever not in LEVERS:
            raise ValueError(f"Expected lever in {LEVERS}, but got {self.lever!r}.")
        if self.lever == "condition" and not _CONDITION_TENSORS <= set(self.lever_tensors):
            raise ValueError(
                f"Expected tensors {sorted(_CONDITION_TENSORS)} for a condition map, but got "
                f"{sorted(self.lever_tensors)}."
            )
        _check_tensors(self.lever, self.lever_tensors, "lever.")
        _check_tensors(None, self.samples, "sample.")
        if len(set(zip(self.components, self.names, strict=True))) != n:
            raise ValueError(f"Expected each block once, but got duplicates in {self.names}.")
        missing = sorted(set(self.components) - set(self.fingerprints))
        if missing:
            raise ValueError(f"Expected a fingerprint for every component, but got none for {missing}.")
        try:
            json.dumps(self.meta)
        except TypeError as e:
            raise ValueError(
                f"Expected meta to be JSON-serialisable (str, numbers, lists, dicts), but got: {e}"
            ) from e
        LeverConfig.from_meta(self.meta)  # the lever's settings in meta are valid

    @property
    def lever_config(self) -> LeverConfig:
        """How this map's lever acts (gains, pull, scale, fidelity mode), validated; stored in `meta`."""
        return LeverConfig.from_meta(self.meta)

    def with_lever(self, **changes) -> BlockMap:
        """A copy whose lever settings are changed, e.g. `bmap.with_lever(pull_max=2.0)` (validated; None: the
        default again). Works on a map whose meta holds a bad setting too, to fix it."""
        unknown = sorted(set(changes) - set(LEVER_KEYS))
        if unknown:
            raise ValueError(f"Expected lever settings among {list(LEVER_KEYS)}, but got unknown {unknown}.")
        meta = {k: v for k, v in {**self.meta, **changes}.items() if not (k in LEVER_KEYS and v is None)}
        return dataclasses.replace(self, meta=meta)  # __post_init__ validates the settings

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_scores(
        cls,
        model: torch.nn.Module,
        scores: Mapping[str, float | Sequence[float]],
        levels: Sequence[float] | None = None,
        component: str | None = None,
        method: str = "manual",
        meta: dict | None = None,
    ) -> BlockMap:
        """A hand-made map: `{block name: score}` or `{block name: [score per level]}` with `levels=`.

        >>> BlockMap.from_scores(unet, {"mid_block": [0.2, 0.9]}, levels=[0.1, 0.9])
        BlockMap(1 blocks, granularity='stage', method='manual', levels=2, components=['unet'])
        """
        if not isinstance(unwrap(model), torch.nn.Module):
            raise TypeError(f"Expected a denoiser module (e.g. pipe.unet), but got {type(model).__name__}.")
        if not scores:
            raise ValueError("Expected at least one {block name: score}, but got an empty mapping.")
        blocks = find_blocks(model, names=list(scores))
        rows = [[float(x) for x in torch.as_tensor(v, dtype=torch.float64).reshape(-1)] for v in scores.values()]
        width = max((len(r) for r in rows), default=1)
        if levels is None and width > 1:
            raise ValueError(
                f"Expected levels=[...] (noise levels in [0, 1]) for {width} scores per block, but got None."
            )
        if levels is not None and any(len(r) not in (1, len(levels)) for r in rows):
            raise ValueError(
                f"Expected 1 or {len(levels)} scores per block (one per level), but got "
                f"{sorted({len(r) for r in rows})}."
            )
        width = len(levels) if levels is not None else 1
        table = torch.tensor([r * width if len(r) == 1 else r for r in rows], dtype=torch.float32).reshape(-1, width)
        targets: dict[str, str] = {}
        for b in blocks:
            for leaf in b.leaves():
                if leaf.target in targets:
                    raise ValueError(
                        f"Expected blocks that do not overlap, but {targets[leaf.target]!r} and {b.name!r} both "
                        f"contain {leaf.name!r}. Score either a stage or its units, not both."
                    )
                targets[leaf.target] = b.name
        kinds = [b.kind for b in blocks]
        stage = {k == "stage" for k in kinds}
        granularity = "mixed" if len(stage) > 1 else ("stage" if stage == {True} else "unit")
        component = component or default_component(model)
        fp, sample = _fingerprint_and_sample(model)
        return cls([b.name for b in blocks], table, levels, kinds, [component] * len(blocks), {component: fp},
                   granularity, method, dict(meta or {}), {component: sample})  # fmt: skip

    @classmethod
    def combine(cls, *maps: BlockMap) -> BlockMap:
        """One map over several denoisers (e.g. Wan 2.2's `transformer` and `transformer_2`), same levels."""
        if len({m.granularity for m in maps}) > 1 or any(not _same_levels(m.levels, maps[0].levels) for m in maps):
            raise ValueError("Expected maps with the same granularity and noise levels, but they differ.")
        comps = [c for m in maps for c in m.fingerprints]
        if len(comps) != len(set(comps)):
            raise ValueError(f"Expected maps of distinct components, but got {comps}.")
        return cls([n for m in maps for n in m.names], torch.cat([m.scores for m in maps]), maps[0].levels,
                   [k for m in maps for k in m.kinds], [c for m in maps for c in m.components],
                   {c: f for m in maps for c, f in m.fingerprints.items()}, maps[0].granularity,
                   "+".join(dict.fromkeys(m.method for m in maps)), {"combined": [m.meta for m in maps]},
                   {c: s for m in maps for c, s in m.samples.items()})  # fmt: skip

    def select(self, component: str) -> BlockMap:
        """The part of the map for one component."""
        if component not in self.fingerprints:
            raise ValueError(
                f"Expected a component of this map ({', '.join(self.fingerprints)}), but got {component!r}."
            )
        rows = [i for i, c in enumerate(self.components) if c == component]
        return BlockMap([self.names[i] for i in rows], self.scores[rows], self.levels, [self.kinds[i] for i in rows],
                        [component] * len(rows), {component: self.fingerprints[component]}, self.granularity,
                        self.method, self.meta, {k: v for k, v in self.samples.items() if k == component},
                        self.lever, for_component(self.lever_tensors, component))  # fmt: skip

    def shuffled(self, seed: int = 0) -> BlockMap:
        """A control: the same blocks and scores, with the scores' rows permuted across blocks by `seed`.

        For a condition map the memorized subspace is replaced too, by as many random orthonormal directions in the
        same whitened space (its threshold recomputed on the general bank): same structure and magnitudes, nothing
        learned about where memory lives.
        """
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(self.n_blocks, generator=gen)
        meta = {**self.meta, "control": {"shuffled_seed": seed, "permutation": perm.tolist()}}
        tensors = dict(self.lever_tensors)
        if self.lever == "condition":
            if any("@" in k for k in tensors):
                raise ValueError(
                    "Expected a condition map with one subspace per denoiser for a random-subspace control, but this "
                    "one has a subspace per joint-attention block (memctl.joint), whose whitening the map lacks."
                )
            for own in ("", *(SEP + c for c in sorted(qualifiers(tensors)))):  # each denoiser's in its own space
                d, k = tensors["read" + own].shape
                q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
                tensors["read" + own] = (tensors["g_inv_half" + own].double() @ q).float()
                tensors["tau" + own] = weight_threshold(tensors["bank" + own], tensors["read" + own])
        return BlockMap(self.names, self.scores[perm], self.levels, self.kinds, self.components,
                        dict(self.fingerprints), self.granularity, self.method, meta, dict(self.samples),
                        self.lever, tensors)  # fmt: skip

    # --- properties ---------------------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return len(self.names)

    @property
    def per_level(self) -> bool:
        return self.levels is not None

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the map's single denoiser (see `fingerprints` for several)."""
        if len(self.fingerprints) != 1:
            raise ValueError(f"Expected a map of one denoiser, but this one has {list(self.fingerprints)}.")
        return next(iter(self.fingerprints.values()))

    # --- checks -------------------------------------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module, component: str | None = None) -> None:
        """Raise if `model` is not the denoiser this map was made for (a dtype cast of it is fine)."""
        if component is None:
            component = next(iter(self.fingerprints)) if len(self.fingerprints) == 1 else default_component(model)
        expected = self.select(component).fingerprint
        got, sample = _fingerprint_and_sample(model)
        if got == expected:
            return
        if got.split("-")[0] == expected.split("-")[0] and component in self.samples:
            if _same_up_to_cast(self.samples[component], sample):
                return
        what = "its config differs" if got.split("-")[0] != expected.split("-")[0] else "its weights differ"
        raise ValueError(
            f"This map was made for a different model: expected fingerprint {expected} for {component!r}, but got "
            f"{got} from {type(unwrap(model)).__name__} ({what}). Make a map for this model (memctl.probe or "
            f"BlockMap.from_scores), or load the map made for it."
        )

    # --- io -----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able summary: everything but the weight samples."""
        return {
            "names": self.names,
            "scores": self.scores.tolist(),
            "levels": None if self.levels is None else self.levels.tolist(),
            "kinds": self.kinds,
            "components": self.components,
            "fingerprints": self.fingerprints,
            "granularity": self.granularity,
            "method": self.method,
            "meta": self.meta,
            "lever": self.lever,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockMap):
            return NotImplemented
        return (
            self.to_dict() == other.to_dict()
            and self.samples.keys() == other.samples.keys()
            and all(torch.equal(v, other.samples[k]) for k, v in self.samples.items())
            and self.lever_tensors.keys() == other.lever_tensors.keys()
            and all(torch.equal(v, other.lever_tensors[k]) for k, v in self.lever_tensors.items())
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (scores, levels, weight samples; the rest as JSON metadata), atomically."""
        info = {k: v for k, v in self.to_dict().items() if k not in ("scores", "levels")}
        tensors = {"scores": self.scores.contiguous()}
        if self.levels is not None:
            tensors["levels"] = self.levels.contiguous()
        tensors.update({f"sample.{c}": s.contiguous() for c, s in self.samples.items()})
        tensors.update({f"lever.{k}": v.contiguous() for k, v in self.lever_tensors.items()})
        metadata = {"format": _FORMAT, "version": str(_VERSION), "blockmap": json.dumps(info)}
        with atomic_path(os.path.abspath(path)) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BlockMap:
        """Read a map written by `save`; a missing, corrupt or foreign file is a clear error."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Expected a block map file at {path!r}, but there is no such file.")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"no {_FORMAT!r} metadata")
            if int(metadata.get("version", -1)) > _VERSION:
                raise ValueError(f"format version {metadata['version']} is newer than this memctl ({_VERSION})")
            info = json.loads(metadata["blockmap"])
            samples = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("sample.")}
            lever = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("lever.")}
            return cls(
                scores=tensors["scores"], levels=tensors.get("levels"), samples=samples, lever_tensors=lever, **info
            )
        except Exception as e:
            raise ValueError(
                f"Expected a memctl block map (a .safetensors file written by BlockMap.save), but could not read "
                f"{path!r}: {e}"
            ) from e

    def table(self) -> str:
        """A readable text table of the scores, one row per block."""
        comp = len(self.fingerprints) > 1
        heads = [f"t={x:.2f}" for x in self.levels.tolist()] if self.levels is not None else ["score"]
        width = max(
            [len("block")]
            + [len(n) + (len(c) + 1 if comp else 0) for n, c in zip(self.names, self.components, strict=True)]
        )
        lines = [
            f"BlockMap: {self.n_blocks} blocks, {self.granularity}, method {self.method}, lever {self.lever}, "
            + ", ".join(f"{c} {f}" for c, f in self.fingerprints.items()),
            f"{'block':<{width}}  {'kind':<11}" + "".join(f"{h:>9}" for h in heads),
        ]
        for name, kind, c, row in zip(self.names, self.kinds, self.components, self.scores.tolist(), strict=True):
            label = f"{c}:{name}" if comp else name
            lines.append(f"{label:<{width}}  {kind:<11}" + "".join(f"{v:>+9.3f}" for v in row))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"BlockMap({self.n_blocks} blocks, granularity={self.granularity!r}, method={self.method!r}, "
            f"levels={None if self.levels is None else len(self.levels)}, components={list(self.fingerprints)})"
        )


def _check_tensors(lever: str | None, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Every tensor finite and floating; a condition lever's tensors of matching shapes (else NaN images later).

    Shapes: `read` (D, k) with 1 <= k <= D, `tau` () > 0, `bank` (P, L, D), `g_inv_half` (D, D); samples (N,)."""
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"Expected a floating-point tensor `{prefix}{key}`, but got {got}.")
        if not torch.isfinite(t).all():
            n = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"Expected finite values in tensor `{prefix}{key}`, but got {n} NaN or inf of "
                f"{t.numel()}. The map file is damaged: make it again (memctl probe)."
            )
    if prefix == "sample.":
        for key, t in tensors.items():
            if t.ndim != 1:
                raise ValueError(f"Expected tensor `{prefix}{key}` of shape (N,), but got {tuple(t.shape)}.")
        return
    if lever != "condition":
        return
    for component in sorted(qualifiers(tensors)):  # per-denoiser tensors (memctl.experts): read/<component>, ...
        own = for_component(tensors, component)
        if not _CONDITION_TENSORS <= {k.rpartition(SEP)[0] for k in tensors if k.endswith(SEP + component)}:
            raise ValueError(
                f"Expected tensors {', '.join(prefix + k + SEP + component for k in sorted(_CONDITION_TENSORS))} "
                f"together, but got {sorted(k for k in tensors if k.endswith(SEP + component))}."
            )
        _check_condition(own, prefix, "", own["g_inv_half"])
    tensors = {k: v for k, v in tensors.items() if SEP not in k}
    g = tensors["g_inv_half"]
    units = {k.partition("@")[2] for k in tensors if "@" in k}  # per-block tensors (memctl.joint): read@<path>, ...
    for unit in ("", *sorted(units)):
        _check_condition(tensors, prefix, f"@{unit}" if unit else "", g if not unit else None)


def _check_condition(tensors, prefix: str, at: str, g: torch.Tensor | None) -> None:
    missing = [f"{k}{at}" for k in ("read", "tau", "bank") if f"{k}{at}" not in tensors]
    if missing:
        raise ValueError(f"Expected tensors {', '.join(prefix + k for k in missing)} beside the others of {at[1:]}.")
    read, tau, bank = (tensors[f"{k}{at}"] for k in ("read", "tau", "bank"))
    d = read.shape[0] if read.ndim == 2 else None
    checks = [
        (f"read{at}", read.ndim == 2 and 1 <= read.shape[1] <= read.shape[0], "(D, k) with 1 <= k <= D"),
        (f"tau{at}", tau.ndim == 0 and float(tau) > 0, "() holding a number > 0"),
        (f"bank{at}", bank.ndim == 3 and bank.shape[-1] == d and bank.shape[0] >= 1, f"(P, L, D={d}) with P >= 1"),
    ]
    if g is not None:
        checks.append(("g_inv_half", g.shape == (d, d), f"(D, D) = ({d}, {d})"))
    for key, ok, expected in checks:
        if not ok:
            t = tensors[key]
            got = f"{tuple(t.shape)}" + (f" holding {float(t)}" if t.ndim == 0 else "")
            raise ValueError(f"Expected tensor `{prefix}{key}` of shape {expected}, but got {got}.")


def _same_levels(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
