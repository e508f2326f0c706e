"""Loading pipelines: the embedded default, or any diffusers folder or hub id the user has.

>>> import memctl
>>> pipe = memctl.load_default()
>>> type(pipe).__name__
'PixelPipeline'
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from memctl.blocks import require_denoisers


def load_default(name: str = "digits", **kwargs):
    """The embedded default pipeline (offline, CPU fine)."""
    from memctl.zoo.testbed import load_testbed

    return load_testbed(name).pipeline(**kwargs)


def load_pipeline(path_or_hub_id: str | Path, torch_dtype: torch.dtype | None = None, **kwargs):
    """Any diffusers pipeline: a local folder (PixelPipeline folders included) or a hub id (needs the hub)."""
    from diffusers import DiffusionPipeline

    path = Path(path_or_hub_id)
    index_file = path / "model_index.json"
    if path.exists() and not index_file.is_file():
        raise FileNotFoundError(f"Expected a diffusers pipeline folder with model_index.json, but {path} has none.")
    if not path.exists():
        return _from_hub(str(path_or_hub_id), torch_dtype, **kwargs)
    if _class_name(index_file) == "PixelPipeline":
        return _load_pixel(path, torch_dtype)
    if kwargs.pop("local_files_only", None) is None:
        kwargs["local_files_only"] = True
    _import_memctl_components(index_file)
    return DiffusionPipeline.from_pretrained(str(path_or_hub_id), torch_dtype=torch_dtype, **kwargs)


def _from_hub(spec: str, torch_dtype, **kwargs):
    """A hub id (`org/name`); a spec that cannot be one is a missing folder, said as such."""
    from diffusers import DiffusionPipeline

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec) or spec.startswith("."):
        raise FileNotFoundError(
            f"Expected a pipeline folder or a hub id (org/name), but {spec!r} is neither: no "
            "such folder, and not of the form org/name."
        )
    try:
        return DiffusionPipeline.from_pretrained(spec, torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:  # no network, no such repository, gated, not a pipeline
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"Expected a pipeline folder or a downloadable hub id, but there is no folder "
            f"{spec!r} and the hub did not give it: {first}"
        ) from None


def _class_name(index_file: Path) -> str:
    """The pipeline class a model_index.json names (`_class_name`); a clear error if it names none."""
    try:
        name = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"Expected {index_file} to be a JSON object naming the pipeline class, but reading it failed: {err}"
        ) from None
    name = name[-1] if isinstance(name, list) and name else name
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"Expected {index_file} to have a `_class_name` (the pipeline class, e.g. "
            f'"StableDiffusionPipeline"), but got {name!r}. Is this a diffusers pipeline folder?'
        )
    return name


def _import_memctl_components(index_file: Path) -> None:
    """Import the memctl modules a model_index.json names (the moving-digits `FramePackVAE`): diffusers loads a
    component from a library other than its own only once that library is imported."""
    import importlib

    index = json.loads(index_file.read_text(encoding="utf-8"))
    for value in index.values():
        if isinstance(value, list) and value and isinstance(value[0], str) and value[0].split(".")[0] == "memctl":
            importlib.import_module(value[0])


def _load_pixel(path: Path, torch_dtype):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from memctl.pipeline import PixelPipeline

    dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    pipe = PixelPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **dtype),
        unet=UNet2DConditionModel.from_pretrained(path / "unet", **dtype),
        scheduler=DDIMScheduler.from_pretrained(path / "scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_testbed(name_or_path: str | Path) -> bool:
    """A testbed name (`memctl.zoo.testbed.TESTBEDS`) or a testbed folder (it has `testbed.json`)."""
    from memctl.zoo.testbed import TESTBEDS

    return str(name_or_path) in TESTBEDS or (Path(name_or_path).expanduser() / "testbed.json").is_file()


def load_model_and_testbed(name_or_path: str | Path, **kwargs):
    """(pipeline, testbed or None): a testbed name / folder gives both, any other pipeline folder or hub id only the
    first. The one model resolution of the CLI, the renderer and the app; `kwargs` go to the pipeline's loading."""
    from memctl.zoo.testbed import load_testbed

    if is_testbed(name_or_path):
        tb = load_testbed(name_or_path)
        return tb.pipeline(**kwargs), tb
    return load_pipeline(name_or_path, **kwargs), None


def load_denoisers(name_or_path: str) -> dict:
    """{component: denoiser} of a testbed or pipeline folder (`unet`, `transformer`, `transformer_2`)."""
    return require_denoisers(load_model_and_testbed(name_or_path)[0])
