"""The renderer's `bake: true`: a baked copy of the model per fidelity < 0 the job renders, kept on a rerun,
replaced when stale, refused over files that are not a bake; the job's own outputs are the same as without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from memctl.bake import prompts_sha256
from memctl.cli import main as cli_main
from memctl.jobs import JobError, parse_job
from memctl.render import render_job

torch.set_num_threads(1)

SHOT = {"id": "seven", "prompt": "a seven", "seeds": [0], "fidelity": [-1, 0], "steps": 4, "guidance": 2.0}
JOB = {"model": "digits", "block_map": "shipped", "cpu_threads": 1, "shots": [SHOT]}
BAKED = "baked/f-1.00_strength1.00"


def _job(folder: Path, **top) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, **top}, sort_keys=False))
    return path


def _pixels(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / name))


@pytest.fixture(scope="module")
def baked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bake")
    summary = render_job(_job(tmp, bake=True), tmp / "out")
    return tmp, tmp / "out", summary


def test_bake_true_saves_a_baked_copy_and_renders_as_without_it(baked_run):
    from memctl.loading import load_pipeline
    from memctl.zoo.testbed import load_testbed

    tmp, out, summary = baked_run
    assert summary.ok
    assert summary.baked == [out / BAKED]
    assert "baked copies" in summary.text()
    info = json.loads((out / BAKED / "bake.json").read_text())
    tb = load_testbed("digits")
    assert (info["fidelity"], info["strength"], info["lever"]) == (-1.0, 1.0, "condition")
    assert info["prompts_sha256"] == prompts_sha256([c[0] for c in tb.canaries])  # what `memctl bake` fits on
    plain = render_job(_job(tmp / "plain"), tmp / "plain" / "out")
    for name in ("seven/f-1.00_s0.png", "seven/f+0.00_s0.png"):  # the bake touched neither weights nor hooks
        assert np.array_equal(_pixels(out, name), _pixels(tmp / "plain" / "out", name))
    baked = load_pipeline(str(out / BAKED))
    source = tb.pipeline()
    edited = [k for k, v in baked.unet.state_dict().items() if not torch.equal(v, source.unet.state_dict()[k])]
    assert edited and all(k.endswith(("to_k.weight", "to_v.weight")) for k in edited)
    assert plain.baked == []


def test_rerun_keeps_a_matching_bake_and_replaces_a_stale_one(baked_run, tmp_path):
    tmp, out, _ = baked_run
    bake_json = out / BAKED / "bake.json"
    before = bake_json.stat().st_mtime_ns
    again = render_job(_job(tmp, bake=True), out)
    assert again.baked == [out / BAKED]
    assert bake_json.stat().st_mtime_ns == before  # kept, not baked again
    info = json.loads(bake_json.read_text())
    bake_json.write_text(json.dumps({**info, "map_sha256": "stale"}))
    render_job(_job(tmp, bake=True), out)
    assert json.loads(bake_json.read_text())["map_sha256"] == info["map_sha256"]  # baked again from this map


def test_a_folder_that_is_not_a_bake_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / BAKED).mkdir(parents=True)
    (out / BAKED / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        render_job(_job(tmp_path, bake=True), out)
    assert (out / BAKED / "mine.txt").read_text() == "keep me"


def test_bake_prompts_file_is_used_and_a_missing_one_is_refused(tmp_path, capsys):
    (tmp_path / "mem.txt").write_text("# memorized\na seven\n")
    out = tmp_path / "out"
    render_job(_job(tmp_path, bake=True, bake_prompts="mem.txt", shots=[{**SHOT, "fidelity": -0.5}]), out)
    info = json.loads((out / "baked/f-0.50_strength1.00/bake.json").read_text())
    assert info["prompts_sha256"] == prompts_sha256(["a seven"])
    assert info["fidelity"] == -0.5
    job = _job(tmp_path / "missing", bake=True, bake_prompts="nowhere.txt")
    assert cli_main(["render", str(job), "--out", str(tmp_path / "missing" / "out")]) == 2
    assert "field `bake_prompts`: Expected a readable UTF-8 text file" in capsys.readouterr().err
    assert not (tmp_path / "missing" / "out").exists()


@pytest.mark.parametrize(
    "top, shot, words",
    [
        ({"bake": "yes"}, {}, "field `bake`: Expected true or false, but got str 'yes'"),
        ({"bake": True, "block_map": None}, {"fidelity": 0}, "Expected a job with a `block_map`"),
        ({"bake": True}, {"fidelity": [0, 1]}, "with a fidelity below 0 to bake"),
        ({"bake": True}, {"window": [0.0, 0.5]}, "field `window`: Expected [0, 1] with `bake: true`"),
        ({"bake_prompts": "p.txt"}, {}, "field `bake_prompts`: Expected it only with `bake: true`"),
    ],
)
def test_bad_bake_settings_are_clear_errors(top, shot, words):
    with pytest.raises(JobError) as info:
        parse_job({**JOB, **top, "shots": [{**SHOT, **shot}]})
    assert any(words in e for e in info.value.errors), info.value.errors


def test_bake_settings_cover_every_negative_fidelity_strength_and_the_guard():
    shots = [{**SHOT, "fidelity": [-1, -0.5, 0, 1]}, {**SHOT, "id": "two", "fidelity": -1, "strength": 2}]
    job = parse_job({**JOB, "bake": True, "guard": "detect", "guard_fidelity": -0.25, "shots": shots})
    assert job.bake_settings() == [(-1.0, 1.0), (-1.0, 2.0), (-0.5, 1.0), (-0.25, 1.0), (-0.25, 2.0)]
    assert parse_job({**JOB, "shots": shots}).bake_settings() == []
