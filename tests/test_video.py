"""memctl.video: the frames of every video family to MP4 and GIF, read back with their count and exact size."""

import doctest
import sys

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

import memctl.video
from memctl.video import as_uint8_frames, export_gif, export_mp4
from tests.tiny import PIPELINE_FAMILIES, tiny_pipeline


def _read_mp4(path) -> tuple[tuple[int, int], int]:
    """((width, height), frame count) as ffmpeg decodes the file."""
    frames = imageio_ffmpeg.read_frames(str(path))
    meta = next(frames)
    return tuple(meta["size"]), sum(1 for _ in frames)


def _read_gif(path) -> tuple[tuple[int, int], int]:
    with Image.open(path) as im:
        return im.size, im.n_frames


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
@pytest.mark.parametrize("name", ["animatediff", "cogvideox", "wan"])
def test_pipeline_frames_export_and_read_back(name, output_type, tmp_path):
    call = PIPELINE_FAMILIES[name].call
    pipe = tiny_pipeline(name)
    frames = pipe(**{**call, "output_type": output_type}, generator=torch.Generator().manual_seed(0)).frames[0]
    n, size = call["num_frames"], (call["width"], call["height"])
    video = as_uint8_frames(frames)
    assert video.shape == (n, size[1], size[0], 3)
    assert video.dtype == np.uint8
    assert all((video[i] != video[i + 1]).any() for i in range(n - 1))  # distinct frames: GIF keeps them all
    export_mp4(frames, tmp_path / "clip.mp4", fps=8, comment="fidelity=-0.5")
    export_gif(frames, tmp_path / "clip.gif", fps=8, comment="fidelity=-0.5")
    assert _read_mp4(tmp_path / "clip.mp4") == (size, n)
    assert _read_gif(tmp_path / "clip.gif") == (size, n)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4"]  # no temporary file left


@pytest.mark.parametrize("h, w", [(7, 9), (30, 46)])
def test_exact_size_is_kept_even_when_odd(h, w, tmp_path):
    frames = np.random.RandomState(0).rand(4, h, w, 3).astype(np.float32)  # (F, H, W, C) in [0, 1]
    assert _read_mp4(export_mp4(frames, tmp_path / "a.mp4")) == ((w, h), 4)
    assert _read_gif(export_gif(frames, tmp_path / "a.gif")) == ((w, h), 4)


def test_metadata_comment(tmp_path):
    frames = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(3)]
    assert (
        b"memctl fidelity=-0.5" in export_mp4(frames, tmp_path / "a.mp4", comment="memctl fidelity=-0.5").read_bytes()
    )
    with Image.open(export_gif(frames, tmp_path / "a.gif", fps=4, comment="memctl")) as im:
        assert im.info["comment"] == b"memctl"
        assert im.info["duration"] == 250
        assert im.info["loop"] == 0


def test_frame_formats_agree():
    rng = np.random.RandomState(0)
    video = rng.randint(0, 256, (3, 4, 6, 3)).astype(np.uint8)  # (F, H, W, C)
    as_tensor = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255  # (F, C, H, W)
    for frames in (video, video / 255.0, list(video), [Image.fromarray(f) for f in video], as_tensor, list(as_tensor)):
        assert np.array_equal(as_uint8_frames(frames), video)
    gray = as_uint8_frames(np.zeros((2, 4, 6, 1), np.uint8))
    assert gray.shape == (2, 4, 6, 3)


@pytest.mark.parametrize(
    "frames, error, match",
    [
        (np.zeros((1, 2, 4, 4, 3)), ValueError, r"a batch of shape \(1, 2, 4, 4, 3\): pass frames\[0\]"),
        ([[Image.new("RGB", (4, 4))]], ValueError, "a list of videos: pass frames"),
        ([], ValueError, "at least one frame"),
        (np.zeros((2, 4, 4, 2)), ValueError, "C in 1, 3, 4"),
        ([np.zeros((4, 4, 3)), np.zeros((4, 5, 3))], ValueError, "frames of one shape"),
        (np.zeros((2, 4, 4, 3), np.int32), ValueError, "uint8 or float"),
        ("clip.mp4", TypeError, "Expected a list of frames"),
    ],
)
def test_bad_frames_are_a_clear_error(frames, error, match, tmp_path):
    with pytest.raises(error, match=match):
        export_gif(frames, tmp_path / "a.gif")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fps", [0, -1, float("nan"), True, "8"])
def test_bad_fps(fps, tmp_path):
    with pytest.raises(ValueError, match=r"Expected fps in \(0, 240\]"):
        export_mp4(np.zeros((2, 4, 4, 3)), tmp_path / "a.mp4", fps=fps)


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.mp4"
    path.write_bytes(b"old")

    def broken(*args, **kwargs):
        yield
        raise OSError("disk full")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken)
    with pytest.raises(OSError, match="disk full"):
        export_mp4(np.zeros((2, 4, 4, 3)), path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]


def test_missing_ffmpeg_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(ImportError, match=r'pip install "memctl\[video\]"'):
        export_mp4(np.zeros((2, 4, 4, 3)), tmp_path / "a.mp4")


def test_docstring_examples(tmp_path):
    globs = {"pipe": tiny_pipeline("animatediff"), "tmp": tmp_path, "torch": torch}
    assert doctest.testmod(memctl.video, extraglobs=globs).failed == 0
