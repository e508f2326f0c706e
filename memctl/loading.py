"""Loading pipelines: the embedded default, or any diffusers folder or hub id the user has.

>>> import memctl
>>> pipe = memctl.load_default()
>>> type(pipe).__name__
'PixelPipeline'
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memctl.blocks import pipeline_denoisers


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
    if index_file.is_file() and _class_name(index_file) == "PixelPipeline":
        return _load_pixel(path, torch_dtype)
    if kwargs.pop("local_files_only", None) is None and path.exists():
        kwargs["local_files_only"] = True
    return DiffusionPipeline.from_pretrained(str(path_or_hub_id), torch_dtype=torch_dtype, **kwargs)


def _class_name(index_file: Path) -> str:
    name = json.loads(index_file.read_text())["_class_name"]
    return name[-1] if isinstance(name, list) else name


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


def load_model_and_testbed(name_or_path: str):
    """(pipeline, testbed or None): a testbed name / folder gives both, any other pipeline folder only the first."""
    from memctl.zoo.testbed import TESTBEDS, load_testbed

    if name_or_path in TESTBEDS or (Path(name_or_path) / "testbed.json").is_file():
        tb = load_testbed(name_or_path)
        return tb.pipeline(), tb
    return load_pipeline(name_or_path), None


def load_denoisers(name_or_path: str) -> dict:
    """{component: denoiser} of a testbed or pipeline folder (`unet`, `transformer`, `transformer_2`)."""
    pipe, _ = load_model_and_testbed(name_or_path)
    found = pipeline_denoisers(pipe)
    if not found:
        raise ValueError(f"Expected a pipeline with a unet or transformer, but {type(pipe).__name__} has neither.")
    return found
