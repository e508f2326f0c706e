"""Custom pipeline files: one class each, load with custom_pipeline=, survive save → load, one-call knob arguments."""

import doctest
import importlib.util
import json
import types
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.dynamic_modules_utils import find_pipeline_class
from PIL import Image

import memctl
import memctl.pipelines
from memctl.blocks import find_blocks
from memctl.detection import condition_argument, detect
from memctl.hooks import list_hooks
from memctl.knob import apply_knob, get_knob, set_fidelity, temporary_knob
from memctl.pipeline import PixelPipeline
from memctl.pipelines import PIPELINES, FidelityMixin, call_parameters, pipeline_file
from memctl.zoo.testbed import assets_dir
from tests.tiny import PIPELINE_FAMILIES, denoisers, full_map, sample, tiny_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`saved(name)`: the folder of the tiny pipeline `name`, saved once per module."""
    folders = {}

    def get(name):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(name)
            tiny_pipeline(name).save_pretrained(folders[name])
        return folders[name]

    return get


def _load(folder, name, custom=True):
    kwargs = {"custom_pipeline": pipeline_file(PIPELINE_FAMILIES[name].custom)} if custom else {}
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **kwargs, **PIPELINE_FAMILIES[name].load)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_file_knows_every_family():
    for name in ("digits", "sd", "sdxl", "sd3", "flux", "dit", "animatediff", "cogvideox", "wan"):
        assert Path(pipeline_file(name)).is_file()
    assert {Path(pipeline_file(n)).name for n in PIPELINES} == {
        p.name for p in memctl.pipelines.pipelines_dir().glob("memctl_*.py")
    }
    with pytest.raises(ValueError, match=r"Expected a pipeline name in .*, but got 'sdx'. Did you mean 'sdxl'"):
        pipeline_file("sdx")


@pytest.mark.parametrize("name", list(PIPELINES))
def test_each_file_defines_one_pipeline_class(name):
    """As diffusers' loader finds it: exactly one non-diffusers DiffusionPipeline subclass per file."""
    path = Path(pipeline_file(name))
    spec = importlib.util.spec_from_file_location(f"memctl_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = find_pipeline_class(module)
    assert cls.__name__.startswith("Memctl")
    assert cls.__module__ == module.__name__
    if name != "digits":
        assert issubclass(cls, FidelityMixin)
        assert cls.__mro__[0:2] == (cls, FidelityMixin)


@pytest.mark.parametrize("name", list(PIPELINE_FAMILIES))
def test_custom_pipeline_loads_and_survives_save_and_load(name, saved, tmp_path):
    # The reference is the plain diffusers class loaded from the same folder: a loaded tiny Wan differs from the one
    # built in memory by ~6e-7 (also for diffusers' own WanPipeline), which is no concern of the custom file.
    ref = sample(_load(saved(name), name, custom=False), name)
    pipe = _load(saved(name), name)
    assert type(pipe).__name__.startswith("Memctl")
    assert isinstance(pipe, FidelityMixin)
    bmap = full_map(pipe)
    assert torch.equal(sample(pipe, name), ref)  # no knob arguments: the plain call
    assert torch.equal(sample(pipe, name, fidelity=0.0, block_map=bmap), ref)
    changed = sample(pipe, name, fidelity=-1.0, block_map=bmap)
    assert not torch.equal(changed, ref)
    assert get_knob(pipe) is None  # the call's knob is gone afterwards
    pipe.save_pretrained(tmp_path / "again")
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    stem = Path(pipeline_file(PIPELINE_FAMILIES[name].custom)).stem
    assert index["_class_name"] == [stem, type(pipe).__name__]
    assert (tmp_path / "again" / f"{stem}.py").is_file()
    again = _load(tmp_path / "again", name, custom=False)  # no custom_pipeline=: the folder says which class
    assert type(again).__name__ == type(pipe).__name__
    assert torch.equal(sample(again, name, fidelity=-1.0, block_map=bmap), changed)


def _image(h, w, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


# name -> (family of the folder it loads from, diffusers class, call keywords); same components as the family's.
VARIANTS = {
    "sd_img2img": ("sd", "StableDiffusionImg2ImgPipeline", {"image": _image(8, 8), "guidance_scale": 5.0}),
    "sdxl_img2img": ("sdxl", "StableDiffusionXLImg2ImgPipeline", {"image": _image(8, 8), "guidance_scale": 5.0}),
    "sd3_img2img": ("sd3", "StableDiffusion3Img2ImgPipeline", {"image": _image(8, 8), "guidance_scale": 5.0}),
    "flux_img2img": ("flux", "FluxImg2ImgPipeline", {"image": _image(8, 8), "height": 8, "width": 8,
                                                     "max_sequence_length": 8}),
    "animatediff_v2v": ("animatediff", "AnimateDiffVideoToVideoPipeline",
                        {"video": [_image(8, 8, i) for i in range(3)], "height": 8, "width": 8}),
    "cogvideox_v2v": ("cogvideox", "CogVideoXVideoToVideoPipeline", {"video": [_image(32, 32, i) for i in range(9)],
                      "height": 32, "width": 32, "max_sequence_length": 8, "guidance_scale": 2.0}),
    "wan_v2v": ("wan", "WanVideoToVideoPipeline", {"video": [_image(16, 16, i) for i in range(5)], "height": 16,
                "width": 16, "max_sequence_length": 8, "guidance_scale": 2.0}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_img2img_and_video2video_variants(name, saved, monkeypatch):
    family, base, kwargs = VARIANTS[name]
    if name == "wan_v2v":  # diffusers' Wan video-to-video cleans prompts with ftfy unconditionally
        module = importlib.import_module(diffusers.WanVideoToVideoPipeline.__module__)
        if not hasattr(module, "ftfy"):
            monkeypatch.setattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda s: s), raising=False)
    pipe = DiffusionPipeline.from_pretrained(saved(family), custom_pipeline=pipeline_file(name),
                                             trust_remote_code=True, **PIPELINE_FAMILIES[family].load)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    plain = getattr(diffusers, base).from_pipe(pipe)
    assert isinstance(pipe, getattr(diffusers, base))
    assert type(plain) is getattr(diffusers, base)
    bmap = full_map(pipe)
    output = PIPELINE_FAMILIES[family].output

    def call(p, **extra):
        out = p(prompt="ab", strength=0.7, num_inference_steps=3, output_type="pt", **kwargs, **extra,
                generator=torch.Generator().manual_seed(0))  # fmt: skip
        return getattr(out, output)

    ref = call(plain)
    assert torch.equal(call(pipe), ref)
    assert torch.equal(call(pipe, fidelity=0.0, block_map=bmap), ref)
    assert not torch.equal(call(pipe, fidelity=-1.0, block_map=bmap), ref)
    assert get_knob(pipe) is None


def test_digits_custom_pipeline_loads():
    pipe = DiffusionPipeline.from_pretrained(assets_dir() / "digits-s0", custom_pipeline=pipeline_file("digits"),
                                             trust_remote_code=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "MemctlPixelPipeline"
    kw = {"num_inference_steps": 2, "output_type": "pt"}
    ref = pipe("a seven", generator=torch.Generator().manual_seed(0), **kw).images
    bmap = full_map(pipe)
    assert torch.equal(pipe("a seven", fidelity=0.0, block_map=bmap, generator=torch.Generator().manual_seed(0),
                            **kw).images, ref)  # fmt: skip


def _custom_and_plain(name, saved, monkeypatch):
    """`(custom pipeline of file `name`, the plain diffusers pipeline on the same components, call keywords)`."""
    if name == "digits":
        pipe = DiffusionPipeline.from_pretrained(assets_dir() / "digits-s0", custom_pipeline=pipeline_file(name),
                                                 trust_remote_code=True)  # fmt: skip
        plain, call = PixelPipeline(**pipe.components), {"num_inference_steps": 2}
    elif name in VARIANTS:
        family, base, kwargs = VARIANTS[name]
        if name == "wan_v2v":  # as in test_img2img_and_video2video_variants
            module = importlib.import_module(diffusers.WanVideoToVideoPipeline.__module__)
            if not hasattr(module, "ftfy"):
                monkeypatch.setattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda s: s), raising=False)
        pipe = DiffusionPipeline.from_pretrained(saved(family), custom_pipeline=pipeline_file(name),
                                                 trust_remote_code=True, **PIPELINE_FAMILIES[family].load)  # fmt: skip
        plain = getattr(diffusers, base).from_pipe(pipe)
        call = {**kwargs, "strength": 0.7, "num_inference_steps": 3}
        source = "image" if "image" in call else "video"  # img2img / v2v encode source[i] with generator[i]:
        call[source] = [call[source]] * 3  # one per prompt (3 below)
        if family == "flux":  # Flux runs an unconditional pass only with true CFG
            call.update(negative_prompt="c", true_cfg_scale=2.0)
    else:
        pipe = _load(saved(name), name)
        plain = _load(saved(name), name, custom=False)
        call = dict(PIPELINE_FAMILIES[name].call)
    for p in (pipe, plain):
        p.set_progress_bar_config(disable=True)
    call = {k: v for k, v in call.items() if k not in ("prompt", "class_labels", "guidance_scale", "output_type")}
    return pipe, plain, call


@pytest.mark.parametrize("name", list(PIPELINES))
def test_detect_and_prompt_probe_on_every_custom_pipeline(name, saved, monkeypatch):
    """`FidelityMixin.__call__(*args, fidelity=..., **kwargs)` must not hide `prompt` / `class_labels` from memctl."""
    pipe, plain, call = _custom_and_plain(name, saved, monkeypatch)
    assert type(pipe).__name__.startswith("Memctl")
    assert not type(plain).__name__.startswith("Memctl")
    condition = "class_labels" if name == "dit" else "prompt"
    assert {condition, "fidelity", "block_map"} <= set(call_parameters(pipe))
    conds = ([1], [2, 3]) if name == "dit" else (["ab"], ["ba", "aa"])
    kw = dict(seeds=2, guidance_scale=2.0, progress=False, **call)
    scores = detect(pipe, conds[0] + conds[1], **kw)
    assert [s.prompt for s in scores] == conds[0] + conds[1]
    assert all(s.magnitude > 0 for s in scores)
    assert scores == detect(plain, conds[0] + conds[1], **kw)  # the same reading as the plain diffusers class
    probes = memctl.ProbeSet(memorized=[(c, None) for c in conds[0]], general=[(c, None) for c in conds[1]])
    bmap = memctl.probe(pipe, probes, method="prompt", progress=False, call_kwargs=call)
    found = denoisers(pipe)
    assert sorted(bmap.fingerprints) == sorted(found)
    assert bmap.method == "prompt"
    assert len(bmap.names) == sum(len(find_blocks(m)) for m in found.values())
    assert bool(torch.isfinite(bmap.scores).all())
    assert bmap.scores.abs().sum() > 0
    assert all(list_hooks(m) == [] for m in found.values())


def test_call_parameters_see_through_the_mixin():
    class Base:
        def __call__(self, prompt, height=8, **kwargs):
            return prompt

    class Custom(FidelityMixin, Base):
        pass

    class Closed:
        def __call__(self, image):
            return image

    assert list(call_parameters(Custom())) == ["fidelity", "block_map", "fidelity_start", "fidelity_stop",
                                               "fidelity_mode", "prompt", "height"]  # fmt: skip
    assert list(call_parameters(Closed())) == ["image"]
    with pytest.raises(ValueError, match=r"takes neither: \(image\)"):
        condition_argument(Closed(), ["ab"])


def test_temporary_knob_restores_the_applied_knob():
    pipe = tiny_pipeline("sd")
    a, b = full_map(pipe, seed=0), full_map(pipe, seed=1)
    apply_knob(pipe, a, strength=0.5, start=0.1, stop=0.9, passes="cond")
    set_fidelity(pipe, 0.3)
    with temporary_knob(pipe, -1.0, b, start=0.0, stop=1.0):
        inside = get_knob(pipe)
        with_b = sample(pipe, "sd")
    assert (inside.block_map, inside.fidelity, inside.strength, inside.passes) == (b, -1.0, 0.5, "cond")
    assert (inside.start, inside.stop) == (0.0, 1.0)
    after = get_knob(pipe)
    assert (after.block_map, after.fidelity, after.strength, after.start, after.stop, after.passes) == (
        a, 0.3, 0.5, 0.1, 0.9, "cond")  # fmt: skip
    apply_knob(pipe, b, strength=0.5, passes="cond")
    set_fidelity(pipe, -1.0)
    assert torch.equal(sample(pipe, "sd"), with_b)  # the same as applying b for good
    state = pipe.unet._memctl_knob
    with temporary_knob(pipe, 0.5, b, start=0.2):  # the applied map: not re-applied, only fidelity and window
        assert pipe.unet._memctl_knob is state
        assert (state.fidelity, state.start, state.stop) == (0.5, 0.2, 1.0)
    assert pipe.unet._memctl_knob is state
    assert (state.fidelity, state.start, state.stop) == (-1.0, 0.0, 1.0)


def test_temporary_knob_errors_leave_the_knob_as_it_was():
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match="Expected a knob on StableDiffusionPipeline"):
        with temporary_knob(pipe, -0.5):
            pass
    with temporary_knob(pipe):  # nothing asked: nothing done
        assert get_knob(pipe) is None
    bmap = full_map(pipe)
    with pytest.raises(ValueError, match=r"Expected fidelity in \[-1, 1\], but got 2"):
        with temporary_knob(pipe, 2, bmap):
            pass
    with pytest.raises(ValueError, match="Expected fidelity_start <= fidelity_stop"):
        with temporary_knob(pipe, -0.5, bmap, start=0.8, stop=0.2):
            pass
    with pytest.raises(TypeError, match="Expected block_map to be a memctl.BlockMap"):
        with temporary_knob(pipe, -0.5, {"mid_block": 1.0}):
            pass
    assert get_knob(pipe) is None
    assert all(not m._buffers.keys() & {"_memctl_knob_scores"}
                                          for m in denoisers(pipe).values())  # fmt: skip
    apply_knob(pipe, bmap)
    with pytest.raises(RuntimeError), temporary_knob(pipe, -0.5, start=0.5):
        raise RuntimeError
    info = get_knob(pipe)
    assert (info.fidelity, info.start, info.stop) == (0.0, 0.0, 1.0)


def test_fidelity_without_a_map_uses_the_applied_knob(saved):
    pipe = _load(saved("sd"), "sd")
    bmap = full_map(pipe)
    ref = sample(pipe, "sd")
    with pytest.raises(ValueError, match="pass block_map= too, or call memctl.apply_knob"):
        sample(pipe, "sd", fidelity=-1.0)
    apply_knob(pipe, bmap)
    knobbed = sample(pipe, "sd", fidelity=-1.0)
    assert not torch.equal(knobbed, ref)
    assert get_knob(pipe).fidelity == 0.0
    assert torch.equal(sample(pipe, "sd", fidelity=-1.0, fidelity_start=0.0, fidelity_stop=0.0), ref)  # empty window


def test_pipelines_docstring_example(saved):
    folder = saved("sd")
    pipe = _load(folder, "sd")
    globs = {"DiffusionPipeline": DiffusionPipeline, "Path": Path, "folder": folder, "bmap": full_map(pipe)}
    result = doctest.testmod(memctl.pipelines, extraglobs=globs)
    assert result.failed == 0
    assert result.attempted > 0
