"""`memctl render` with `extrapolation: composed`: fidelity < 0 by the prompt's parts, no map; clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_render import JOB, manifest, write_job

from memctl.jobs import JobError, load_job
from memctl.metadata import read_png_settings
from memctl.options import GenerationOptions
from memctl.render import render_job

PROMPT = "a seven, small, bold"
SHOT = {"id": "seven", "prompt": PROMPT, "seeds": [0], "fidelity": [-1, 0], "extrapolation": "composed"}


@pytest.fixture(scope="module")
def pipe():
    from memctl.zoo.testbed import load_testbed

    return load_testbed("digits").pipeline()


def test_composed_shot_renders_without_a_map(tmp_path: Path, pipe):
    out = tmp_path / "out"
    summary = render_job(write_job(tmp_path, {**JOB, "shots": [SHOT]}), out, pipeline=pipe)
    assert summary.ok and len(summary.done) == 2
    plain_shot = {"id": "seven", "prompt": PROMPT, "seeds": [0]}
    plain = render_job(write_job(tmp_path / "plain", {**JOB, "shots": [plain_shot]}), tmp_path / "p", pipeline=pipe)
    assert plain.ok

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path))

    at0, at_minus = pixels(out / "seven/f+0.00_s0.png"), pixels(out / "seven/f-1.00_s0.png")
    assert np.array_equal(at0, pixels(tmp_path / "p" / "seven/f+0.00_s0.png"))  # 0: the model itself
    assert not np.array_equal(at_minus, at0)
    records = {r["name"]: r for r in manifest(out)}
    assert records["seven/f-1.00_s0.png"]["settings"]["extrapolation"] == "composed"
    assert "Extrapolation: composed" in read_png_settings(out / "seven/f-1.00_s0.png")["parameters"]
    assert "encode_prompt" not in pipe.__dict__  # nothing left on the shared pipeline


def test_composed_shot_takes_its_window(tmp_path: Path, pipe):
    """`window` bounds the noise levels where composition acts: the high-noise half gives another image than the
    whole range and than the model itself, and is recorded with the output."""
    shot = {**SHOT, "fidelity": [-1], "window": [0.5, 1.0]}
    out = tmp_path / "out"
    assert render_job(write_job(tmp_path, {**JOB, "shots": [shot]}), out, pipeline=pipe).ok
    full = tmp_path / "full"
    assert render_job(write_job(tmp_path / "f", {**JOB, "shots": [SHOT]}), full, pipeline=pipe).ok
    windowed = np.asarray(Image.open(out / "seven/f-1.00_s0.png"))
    assert not np.array_equal(windowed, np.asarray(Image.open(full / "seven/f-1.00_s0.png")))
    assert not np.array_equal(windowed, np.asarray(Image.open(full / "seven/f+0.00_s0.png")))
    (record,) = manifest(out)
    assert (record["settings"]["start"], record["settings"]["stop"], record["settings"]["extrapolation"]) == (
        0.5,
        1.0,
        "composed",
    )


def test_settings_without_extrapolation_keep_their_keys(tmp_path: Path, pipe):
    from memctl.renderer import Renderer

    job = load_job(write_job(tmp_path, {**JOB, "shots": [{"id": "seven", "prompt": "a seven", "seeds": [0]}]}))
    r = Renderer(job, "cpu", pipeline=pipe)
    o = next(iter(job.outputs()))
    settings = o.settings()
    assert settings["extrapolation"] is None
    del settings["extrapolation"]  # the settings of a render made before the field existed: the same key
    o_old = type("Old", (), {"kind": o.kind, "settings": lambda self: dict(settings), "options": o.options})()
    assert r.key(o) == r.key(o_old)
    composed = GenerationOptions(prompt="a seven", extrapolation="composed")
    assert GenerationOptions.from_dict(composed.to_dict()) == composed
    with pytest.raises(ValueError, match="extrapolation"):
        GenerationOptions(prompt="a seven", extrapolation="pull")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"prompt": "a seven"}, "at least two comma-separated attributes"),
        ({"strength": 2.0}, "field `strength`: Expected 1.0 with extrapolation: composed"),
        ({"fidelity": [1]}, "Expected 0 when the job has no `block_map` (or below 0 with extrapolation: composed)"),
    ],
)
def test_bad_composed_shot_is_a_clear_error(change: dict, words: str, tmp_path: Path, pipe):
    with pytest.raises(JobError) as info:
        render_job(write_job(tmp_path, {**JOB, "shots": [{**SHOT, **change}]}), tmp_path / "out", pipeline=pipe)
    assert any(words in e for e in info.value.errors), info.value.errors
    assert not (tmp_path / "out").exists()


def test_composed_cannot_be_baked(tmp_path: Path):
    with pytest.raises(JobError, match="no weights to bake"):
        load_job(write_job(tmp_path, {**JOB, "block_map": "map.safetensors", "bake": True, "shots": [SHOT]}))
