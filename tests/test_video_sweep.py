"""The video fidelity sweep `memctl demo` writes: fidelity 0 is the plain model, -1 changes clips, files read back."""

import json

import torch
from PIL import Image

from memctl.video import read_mp4_comment
from memctl.video_sweep import _columns, render_video_sweep
from memctl.zoo import load_testbed


def test_video_sweep_columns_and_files(tmp_path):
    torch.set_num_threads(1)
    tb = load_testbed("moving-digits")
    bmap = tb.block_map()  # shipped: bench/ship_maps.py moving-digits
    assert bmap.lever == "condition"
    most, cols = _columns(tb, bmap, 10_000, (0.0, -1.0))
    assert [c[2] for c in most] == [max(tb.exposures)] * len(most)
    assert torch.equal(cols[0], torch.stack([c[1] for c in most]))  # the bound training clips
    plain = tb.pipeline()(
        [c[0] for c in most], generator=[torch.Generator().manual_seed(10_000) for _ in most],
        num_inference_steps=tb.spec["sampling"]["num_inference_steps"], guidance_scale=tb.guidance,
        output_type="pt", **tb.call_kwargs,
    ).frames.float()  # fmt: skip
    assert torch.equal(cols[1], plain)
    assert (cols[2] - cols[1]).abs().mean() > 1e-3

    png, gif, mp4, settings = render_video_sweep(tmp_path, bmap=bmap, fidelities=(0.0,))
    with Image.open(gif) as im:
        assert im.n_frames == tb.frames
    assert Image.open(png).size[0] > Image.open(gif).size[0]  # the strip shows 5 frames per column, the GIF one
    assert read_mp4_comment(mp4)["fidelities"] == [0.0]
    assert json.loads(settings.read_text())["rows"][0]["prompt"] == most[0][0]


def test_an_image_testbed_is_refused_before_any_sampling():
    import pytest

    from memctl.video_sweep import video_testbed

    with pytest.raises(ValueError, match="Expected a video testbed .*'digits' holds images"):
        video_testbed("digits")
