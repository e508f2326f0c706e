"""memctl.check and `memctl check`: the nearest data image of each output and the d1/d2 copy criterion."""

import doctest
import json
import sys

import numpy as np
import pytest
from PIL import Image

import memctl.check
from memctl.check import check_folder
from memctl.cli import main


def _save(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(folder / name)


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    data, out = tmp_path / "data", tmp_path / "out"
    images = [rng.integers(0, 256, (8, 8)) for _ in range(4)]
    for i, im in enumerate(images):
        _save(data / ("sub" if i == 3 else ""), f"d{i}.png", im)
    _save(data, "d0_again.png", images[0])  # an exact duplicate: merged, so a copy of it still counts
    _save(out, "copy.png", np.clip(images[0] + 2, 0, 255))
    _save(out, "new.png", rng.integers(0, 256, (8, 8)))
    _save(out, "copy_nested.png", images[3])
    return out, data


def test_copies_are_found_and_new_images_are_not(folders):
    out, data = folders
    rows = {r.output: r for r in check_folder(out, data)}
    assert rows["copy.png"].copied
    assert rows["copy.png"].nearest == "d0.png"
    assert rows["copy_nested.png"].copied
    assert rows["copy_nested.png"].d1 == 0.0
    assert rows["copy_nested.png"].nearest == "sub/d3.png"
    assert not rows["new.png"].copied
    assert rows["new.png"].ratio > 1 / 3


def test_a_chosen_feature_extractor(folders, tmp_path, monkeypatch):
    out, data = folders
    (tmp_path / "myfeatures.py").write_text("def mean(x):\n    return x.mean(dim=(2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = {r.output: r for r in check_folder(out, data, features="myfeatures:mean")}
    assert rows["copy_nested.png"].copied  # identical images: identical features
    pixels = {r.output: r for r in check_folder(out, data)}
    assert rows["new.png"].d1 != pixels["new.png"].d1
    with pytest.raises(ValueError, match="module:function"):
        check_folder(out, data, features="resnet")
    with pytest.raises(ValueError, match="importable callable"):
        check_folder(out, data, features="myfeatures:nothing")
    sys.modules.pop("myfeatures", None)


def test_cli_check(folders, tmp_path, capsys):
    out, data = folders
    assert main(["check", str(out), "--against", str(data), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["output"]: r["copied"] for r in rows} == {"copy.png": True, "copy_nested.png": True, "new.png": False}
    assert main(["check", str(out), "--against", str(data)]) == 0
    assert "2 of 3 outputs are copies" in capsys.readouterr().out
    assert main(["check", str(out), "--against", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check", str(empty), "--against", str(data)]) == 2
    assert "found none" in capsys.readouterr().err


def test_module_docstring():
    result = doctest.testmod(memctl.check)
    assert result.attempted > 0
    assert result.failed == 0
