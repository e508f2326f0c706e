"""The app's "Bake" button: the current model, block map, fidelity and strength written into a hook-free copy of
the weights (`memctl.bake`), saved as a pipeline folder under the app's output folder.

    >>> folder, info = bake_copy(engine, opts, "digits", "shipped", Path("out/ui/baked/00001"))  # doctest: +SKIP
    >>> info["fidelity"], info["lever"]                                                          # doctest: +SKIP
    (-1.0, 'condition')
"""

from __future__ import annotations

from pathlib import Path

from memctl.bake import bake, fit_prompts
from memctl.options import GenerationOptions

__all__ = ["bake_copy", "bake_message"]


def bake_copy(engine, opts: GenerationOptions, source: str, map_label: str, folder: Path) -> tuple[Path, dict]:
    """Bake `opts.fidelity` and `opts.strength` of the map `map_label` into a copy of `source`'s denoiser, saved to
    `folder`; (folder, provenance). A testbed's bake is fit on its canary prompts, as `memctl bake` does."""
    loaded = engine.model(source)
    bmap = engine.block_map(map_label, loaded)
    if bmap is None:
        raise ValueError(
            "Expected a block map to bake (the map is what goes into the weights), but the block map is 'none'. "
            "Choose the shipped map, load a file or compute one."
        )
    if opts.fidelity == 0:
        raise ValueError(
            "Expected a fidelity below 0 to bake, but got 0: at 0 the knob leaves the model as it is, so a baked copy "
            "would equal it. Move the fidelity slider left."
        )
    if (opts.start, opts.stop) != (0.0, 1.0):
        raise ValueError(
            f"Expected the noise window [0, 1] to bake (a baked copy acts at every noise level), but got "
            f"[{opts.start:g}, {opts.stop:g}]. Reset the window, or use the hooked knob for a narrower one."
        )
    with engine.lock:  # no request's knob is on the model while its weights are copied
        baked = bake(loaded.pipe, bmap, opts.fidelity, folder, strength=opts.strength,
                     prompts=fit_prompts(bmap, loaded.testbed))  # fmt: skip
    return folder, baked._memctl_bake


def bake_message(folder: Path, info: dict, embedded: bool) -> str:
    """What the app says after a bake: where the copy is and how to load it."""
    load = "memctl.load_pipeline" if embedded else "DiffusionPipeline.from_pretrained"
    return (
        f"Baked fidelity {info['fidelity']:+g} (strength {info['strength']:g}, {info['lever']} lever, "
        f"{len(info['edits'])} units edited) into `{folder}`: load it with `{load}('{folder}')`, no hooks. "
        f"The denoiser alone, for tools that load checkpoints, is the file below; provenance in `bake.json`."
    )
