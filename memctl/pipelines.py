"""memctl's custom pipeline files, one per family: where they are installed, and what they add to diffusers.

    >>> path = pipeline_file("sd")
    >>> Path(path).name
    'memctl_sd.py'
    >>> pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=path, trust_remote_code=True)
    >>> image = pipe("ab", fidelity=-0.5, block_map=bmap, num_inference_steps=2, height=8, width=8).images[0]

Each file in `pipelines/` (installed as `memctl/pipelines/`) defines one class, `FidelityMixin` + the diffusers
pipeline of its family, so that diffusers' custom-pipeline loader finds exactly one `DiffusionPipeline` subclass in
it (the mixin is not one, and the files import modules, never classes). `FidelityMixin.__call__` takes `fidelity=`,
`block_map=`, `fidelity_start=`, `fidelity_stop=` and runs the diffusers call inside `memctl.knob.temporary_knob`;
its `save_pretrained` writes `_class_name` as `[file stem, class]` and copies the file next to `model_index.json`,
so the saved folder loads back as the same class with a plain `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

from memctl.atomic import atomic_write
from memctl.knob import temporary_knob

__all__ = ["PIPELINES", "pipeline_file", "pipelines_dir", "FidelityMixin", "call_parameters"]

# name -> file in pipelines/; "_img2img" and "_v2v" take an image or a video to start from.
PIPELINES = {
    "digits": "memctl_digits.py",
    "sd": "memctl_sd.py",
    "sd_img2img": "memctl_sd_img2img.py",
    "sdxl": "memctl_sdxl.py",
    "sdxl_img2img": "memctl_sdxl_img2img.py",
    "sd3": "memctl_sd3.py",
    "sd3_img2img": "memctl_sd3_img2img.py",
    "flux": "memctl_flux.py",
    "flux_img2img": "memctl_flux_img2img.py",
    "dit": "memctl_dit.py",
    "animatediff": "memctl_animatediff.py",
    "animatediff_v2v": "memctl_animatediff_v2v.py",
    "cogvideox": "memctl_cogvideox.py",
    "cogvideox_v2v": "memctl_cogvideox_v2v.py",
    "wan": "memctl_wan.py",
    "wan_v2v": "memctl_wan_v2v.py",
}


def pipelines_dir() -> Path:
    """The folder of custom pipeline files: inside the installed package, else the repository's `pipelines/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "pipelines", here.parent / "pipelines"):
        if (candidate / PIPELINES["sd"]).is_file():
            return candidate
    raise FileNotFoundError(
        f"Expected memctl's custom pipelines in {here / 'pipelines'} or {here.parent / 'pipelines'}, found none. "
        f"Reinstall memctl (the wheel ships them as memctl/pipelines/)."
    )


def pipeline_file(name: str) -> str:
    """Path of the installed custom pipeline file for `name` ("sd", "sdxl", "flux", ..., see `PIPELINES`)."""
    if name not in PIPELINES:
        close = difflib.get_close_matches(str(name), list(PIPELINES), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Expected a pipeline name in {sorted(PIPELINES)}, but got {name!r}.{hint}")
    return str(pipelines_dir() / PIPELINES[name])


def call_parameters(pipe) -> dict[str, inspect.Parameter]:
    """The named parameters of `pipe(...)`, also those a `(*args, **kwargs)` override passes on to its base class.

    `inspect.signature(type(pipe).__call__)` of a custom pipeline shows only `FidelityMixin.__call__`'s own keywords;
    this walks the MRO past every `__call__` that takes `**kwargs` and collects the named ones (the first wins).
    """
    params: dict[str, inspect.Parameter] = {}
    for cls in type(pipe).__mro__:
        if "__call__" not in vars(cls):
            continue
        found = list(inspect.signature(vars(cls)["__call__"]).parameters.values())[1:]  # drop self
        for p in found:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in found):
            break
    return params


class FidelityMixin:
    """Adds the fidelity knob's per-call arguments to a diffusers pipeline (put it first among the bases).

    `fidelity` in [-1, 1] with the map already applied (`memctl.apply_knob`) or passed as `block_map`;
    `fidelity_start` / `fidelity_stop` narrow the window of noise levels for this call; `fidelity_mode` picks how
    fidelity > 0 is computed ("cached", "guidance", "attention": `memctl.apply_knob`). Everything is restored
    after the call. Without any of them the call is the plain diffusers call.
    """

    def __call__(
        self,
        *args: Any,
        fidelity: float | None = None,
        block_map: Any = None,
        fidelity_start: float | None = None,
        fidelity_stop: float | None = None,
        fidelity_mode: str | None = None,
        **kwargs: Any,
    ):
        with temporary_knob(self, fidelity, block_map, fidelity_start, fidelity_stop, fidelity_mode=fidelity_mode):
            return super().__call__(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' `save_pretrained`, then make the folder load back as this class (see the module docstring)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        source = Path(inspect.getfile(type(self)))
        target = Path(save_directory) / source.name
        if not target.exists() or not os.path.samefile(source, target):
            shutil.copyfile(source, target)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = [source.stem, type(self).__name__]
        atomic_write(index, (json.dumps(config, indent=2, sort_keys=False) + "\n").encode())
