"""GenerationOptions validation and PNG settings round-trip."""

import math

import pytest
from PIL import Image

from memctl.metadata import read_png_settings, save_png
from memctl.options import GenerationOptions


def test_round_trip_and_a1111_text():
    opts = GenerationOptions(prompt="a seven", negative_prompt="a one", seed=5, fidelity=-0.5)
    assert GenerationOptions.from_dict(opts.to_dict()) == opts
    text = opts.a1111_parameters(model="digits")
    assert text.startswith("a seven\nNegative prompt: a one\n")
    assert "Seed: 5" in text
    assert "Fidelity: -0.5" in text


@pytest.mark.parametrize(
    "field, value",
    [
        ("fidelity", math.nan),
        ("fidelity", 1.5),
        ("seed", -1),
        ("seed", 1.5),
        ("steps", 0),
        ("guidance", math.inf),
        ("stop", -0.1),
        ("batch_size", 0),
        ("prompt", None),
        ("frames", 0),
        ("seed", True),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        GenerationOptions(**{"prompt": "a one", field: value})


def test_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="unknown field"):
        GenerationOptions.from_dict({"prompt": "a", "fidelty": 0.5})


def test_png_settings_round_trip_and_atomic(tmp_path):
    dest = tmp_path / "x.png"
    save_png(Image.new("L", (8, 8), 3), dest, {"seed": 9, "fidelity": -1.0}, parameters="a seven\nSeed: 9")
    back = read_png_settings(dest)
    assert back["memctl"] == {"seed": 9, "fidelity": -1.0}
    assert back["parameters"].endswith("Seed: 9")
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left behind


def test_failed_png_write_leaves_nothing(tmp_path):
    class Broken(Image.Image):
        def save(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_png(Broken(), tmp_path / "y.png", {"seed": 1})
    assert list(tmp_path.iterdir()) == []
