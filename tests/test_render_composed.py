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


@pytest.fixture(scope="module")
def attr_pipe():
    from memctl.zoo.testbed import load_testbed

    return load_testbed("digits-attr-s0").pipeline()


def test_calibrated_window_is_picked_for_the_model_and_recorded(tmp_path: Path, attr_pipe, capsys):
    """`window: calibrated` runs `calibrate_window` on the testbed's memorized probe pairs once per steps and
    guidance, and every output is rendered and recorded with the window it chose, exactly as a shot that gives that
    window as numbers."""
    from memctl.composed import calibrate_window
    from memctl.effect import calibration_inputs
    from memctl.zoo.testbed import load_testbed

    tb = load_testbed("digits-attr-s0")
    job = {**JOB, "model": "digits-attr-s0", "defaults": {"steps": 2, "guidance": 1.0}}
    shot = {**SHOT, "prompt": tb.canaries[-1][0], "fidelity": [-1], "window": "calibrated", "seeds": [0, 1]}
    out = tmp_path / "out"
    shots = [shot, {**shot, "id": "again", "seeds": [0, 1], "fidelity": [-1]}]  # same steps, guidance: one calibration
    summary = render_job(write_job(tmp_path, {**job, "shots": shots}), out, pipeline=attr_pipe)
    assert summary.ok and len(summary.done) == 4
    assert capsys.readouterr().out.count("calibrating the composed window") == 1
    memorized, reference, calibration = calibration_inputs(tb)
    choice = calibrate_window(attr_pipe, memorized, tb.prompt_parts, reference, steps=2, guidance=1.0, **calibration)
    records = {r["name"]: r["settings"] for r in manifest(out)}
    assert {(s["start"], s["stop"]) for s in records.values()} == {(choice["start"], choice["stop"])}
    assert choice["start"] > 0  # at 2 steps this model's copies stop above a start of 0: a window, not every level
    numbers = {**shot, "window": [choice["start"], choice["stop"]]}
    numbered = write_job(tmp_path / "n", {**job, "shots": [numbers]})
    assert render_job(numbered, tmp_path / "n-out", pipeline=attr_pipe).ok
    for name in ("seven/f-1.00_s0.png", "seven/f-1.00_s1.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(tmp_path / "n-out" / name)))


def test_calibrated_window_needs_composed_and_a_testbed(tmp_path: Path, pipe):
    from memctl.renderer import Renderer

    plain = {"id": "seven", "prompt": PROMPT, "seeds": [0], "fidelity": [-1], "window": "calibrated"}
    with pytest.raises(JobError, match="Expected 'calibrated' only with extrapolation: composed"):
        load_job(write_job(tmp_path / "a", {**JOB, "shots": [plain]}))
    with pytest.raises(JobError, match=r"Expected \[start, stop\] .* or 'calibrated'"):
        load_job(write_job(tmp_path / "b", {**JOB, "shots": [{**SHOT, "window": "auto"}]}))
    job = load_job(write_job(tmp_path / "c", {**JOB, "shots": [{**SHOT, "window": "calibrated"}]}))
    with pytest.raises(ValueError, match="still 'calibrated'"):
        job.outputs()  # unresolved: only a renderer knows the window
    renderer = Renderer.__new__(Renderer)  # the model check alone, as for a model that is no testbed
    renderer.job, renderer.testbed, renderer.calibrations = job, None, {}
    errors: list[str] = []
    renderer._calibrate_windows(errors)
    assert len(errors) == 1 and "Expected a testbed model for 'calibrated'" in errors[0]
