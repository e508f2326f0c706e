"""The app on the embedded video model (moving-digits), through its handlers: clips at the testbed's own size and
length, badges judged on whole clips, and the A/B as two clips side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from memctl.ui.engine import Engine
from memctl.ui.handlers import Handlers
from memctl.ui.views import enlarge

pytestmark = pytest.mark.filterwarnings("ignore:::gradio")
PROMPT = "a three moving left, fast"


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    torch.set_num_threads(1)
    h = Handlers(Engine("moving-digits"), tmp_path_factory.mktemp("ui-video"))
    yield h
    h.close()


def controls(**kw):
    values = dict(prompt=PROMPT, negative="", fidelity=0.0, strength=1.0, start=0.0, stop=1.0, seed=3, steps=3,
                  guidance=5.0, batch=1, frames=9, fps=8, fidelity_mode="cached", extrapolation="map")  # fmt: skip
    return [*{**values, **kw}.values(), "moving-digits", "shipped"]


def frames_of(path) -> list[np.ndarray]:
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")))
        return out


def test_load_sets_the_testbeds_clip_length(handlers):
    info, _, frames, *_ = handlers.load_model("moving-digits", False)
    assert "(video)" in info
    assert frames["visible"] is True
    assert frames["value"] == handlers.engine.model("moving-digits").testbed.call_kwargs["num_frames"]


def test_generate_makes_clips_at_the_testbeds_size_with_clip_badges(handlers):
    gallery, badges, seed, gif = handlers.generate(*controls())
    tb = handlers.engine.model("moving-digits").testbed
    clip = frames_of(gif)
    assert len(clip) == 9
    first = Image.open(gallery[0][0])
    assert first.size == (tb.call_kwargs["width"], tb.call_kwargs["height"])
    assert np.array_equal(clip[0], np.asarray(enlarge(first)))
    assert "seed 3 · " in badges
    assert any(w in badges for w in ("COPY of training image", "novel", "invalid", "near the canary"))


def test_ab_shows_both_clips_side_by_side(handlers):
    tb = handlers.engine.model("moving-digits").testbed
    canary = next(p for p, _, exposure, _ in tb.canaries if exposure == max(tb.exposures))  # what the map pulls
    pair, badges, seed, clips = handlers.compare(*controls(prompt=canary, fidelity=-1.0))
    assert clips["visible"] is True
    a, b = (np.asarray(im) for im in pair)  # the slider's two first frames, enlarged
    frames = frames_of(clips["value"])
    assert len(frames) == 9
    h, w = a.shape[:2]
    assert frames[0].shape == (h, 2 * w + 8, 3)
    assert np.array_equal(frames[0][:, :w], a)
    assert np.array_equal(frames[0][:, w + 8 :], b)
    assert any(not np.array_equal(f[:, :w], f[:, w + 8 :]) for f in frames)  # the shipped map at -1 changes it
    assert "A: fidelity 0" in badges
    assert "B: fidelity -1.00" in badges
