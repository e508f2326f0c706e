"""The `memctl` command line on bad input: a one-line "Expected ..." error and exit status 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import memctl.loading
from memctl.cli import main

torch.set_num_threads(1)


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def probes_file(tmp_path: Path, data) -> str:
    path = tmp_path / "probes.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda tmp: [{"prompt": "a"}, {"prompt": "b"}], '"general": [...]} in'),
        (lambda tmp: {"memorized": {"prompt": "a"}, "general": []}, "Expected `memorized` in"),
        (
            lambda tmp: (tmp / "folder").mkdir() or {"memorized": [{"prompt": "a", "image": "folder"}]},
            "Expected memorized[0] in",
        ),
        (
            lambda tmp: (tmp / "x.png").write_text("no image") and {"memorized": [{"prompt": "a", "image": "x.png"}]},
            "to name an image (PNG, JPEG, ...), but",
        ),
        (lambda tmp: {"memorized": [{"prompt": "a", "image": 3}]}, "Expected memorized[0] to be {'prompt': str"),
    ],
)
def test_bad_probe_files(tmp_path: Path, capsys, make, words: str):
    out = tmp_path / "map.safetensors"
    rc, err = run(capsys, "probe", "digits", "--probes", probes_file(tmp_path, make(tmp_path)), "-o", str(out))
    assert rc == 2 and err.startswith("memctl probe: error: Expected") and words in err, err  # before any loading
    assert "Traceback" not in err
    assert not out.exists()


def test_probe_output_that_is_a_folder_fails_before_probing(tmp_path: Path, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(memctl.loading, "load_model_and_testbed", lambda *a: loads.append(a))
    rc, err = run(capsys, "probe", "digits", "--probes", "testbed", "-o", str(tmp_path))
    assert rc == 2
    assert f"Expected -o to be a file to write, but {tmp_path} is a folder" in err
    rc, err = run(
        capsys,
        "probe",
        "digits",
        "--probes",
        "testbed",
        "-o",
        str(tmp_path / "m.safetensors"),
        "--heatmap",
        str(tmp_path),
    )
    assert rc == 2
    assert "Expected --heatmap to be a file to write" in err
    assert loads == []  # nothing was loaded or probed


def test_model_folders_and_hub_ids(tmp_path: Path, capsys, monkeypatch):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    rc, err = run(capsys, "blocks", str(folder))
    assert rc == 2
    assert "model_index.json to have a `_class_name` (the pipeline class" in err
    (folder / "model_index.json").write_text("[1, 2]")
    rc, err = run(capsys, "blocks", str(folder))
    assert rc == 2
    assert "to be a JSON object naming the pipeline class" in err
    rc, err = run(capsys, "blocks", str(tmp_path / "nowhere"))
    assert rc == 2
    assert "is neither: no such folder, and not of the form org/name" in err

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this model.\nmore details")

    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", offline)
    rc, err = run(capsys, "blocks", "missing/model")
    assert rc == 2
    assert "there is no folder 'missing/model' and the hub did not give it: We couldn't connect" in err
    assert "more details" not in err


@pytest.mark.parametrize(
    "flag, value", [("--batch-size", "0"), ("--limit", "0"), ("--steps", "-1"), ("--batch-size", "two")]
)
def test_detect_counts_must_be_positive(tmp_path: Path, capsys, flag: str, value: str):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a seven\n")
    with pytest.raises(SystemExit) as info:
        main(["detect", str(prompts), flag, value])
    assert info.value.code == 2
    assert f"{flag}: expected an int >= 1, but got '{value}'" in capsys.readouterr().err


def test_detect_limit_scores_the_first_n_and_says_so(tmp_path: Path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a seven {i}\n" for i in range(5)))
    assert main(["detect", str(prompts), "--seeds", "3", "--limit", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert [r["prompt"] for r in json.loads(captured.out)] == ["a seven 0", "a seven 1"]
    assert f"memctl detect: scoring the first 2 of 5 prompts in {prompts} (--limit 2)." in captured.err


def test_disk_errors_are_messages(tmp_path: Path, capsys, monkeypatch):
    import errno
    import os

    import memctl.atomic
    import memctl.render as render

    def full(f, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    job = tmp_path / "job.yaml"
    job.write_text("model: digits\ncpu_threads: 1\nshots: [{id: s, prompt: a seven, seeds: [0], steps: 1}]\n")
    (tmp_path / "out").write_text("a file")
    rc, err = run(capsys, "render", str(job), "--out", str(tmp_path / "out"))
    assert rc == 2
    assert "to be a folder, but it is a file" in err
    monkeypatch.setattr(render, "_write_bytes", full)
    monkeypatch.setattr(memctl.atomic, "_write", full)  # the manifest and contact sheets too
    rc = main(["render", str(job), "--out", str(tmp_path / "o2")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "No space left on device" in captured.out
    assert "Traceback" not in captured.err
