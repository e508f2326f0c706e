"""Export the frames of a video pipeline (AnimateDiff, CogVideoX, Wan) to MP4 and GIF, exact size kept.

    >>> frames = pipe("ab", num_frames=3, num_inference_steps=2, height=8, width=8).frames[0]
    >>> export_mp4(frames, tmp / "clip.mp4", fps=8, comment="fidelity=-0.5").name
    'clip.mp4'
    >>> export_gif(frames, tmp / "clip.gif", fps=8).name
    'clip.gif'

Frames are what diffusers' video pipelines return for one video: a list of PIL images (`output_type="pil"`), a
float array `(F, H, W, C)` in [0, 1] (`"np"`), or a tensor `(F, C, H, W)` in [0, 1] (`"pt"`); uint8 arrays and lists
of arrays or tensors work too. MP4 goes through imageio-ffmpeg (`pip install "memctl[video]"`, its wheel ships
ffmpeg) with `macro_block_size=1`, so a 720×480 video stays 720×480 instead of being resized to multiples of 16:
H.264 in yuv420p when width and height are even (plays everywhere), yuv444p when one is odd (4:2:0 cannot hold odd
sizes; some players refuse 4:4:4). GIF needs only Pillow, which merges identical consecutive frames into one longer
frame (same playback, fewer frames). Files are written to a temporary name and renamed: never half a file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from memctl.atomic import atomic_path

__all__ = ["as_uint8_frames", "encode_mp4", "export_gif", "export_mp4", "read_mp4_comment"]


def _one(frame: Any, channels_first: bool) -> np.ndarray:
    """One frame as a (H, W, C) array; `channels_first` for tensors, (C, H, W)."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGBA" if "A" in frame.getbands() else "RGB"))
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu()
        frame = (frame.permute(1, 2, 0) if channels_first and frame.ndim == 3 else frame).float().numpy()
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr


def as_uint8_frames(frames: Any) -> np.ndarray:
    """`(F, H, W, C)` uint8 RGB(A) frames from PIL images, an array `(F, H, W, C)` or a tensor `(F, C, H, W)`.

    >>> as_uint8_frames(torch.zeros(2, 3, 4, 6)).shape
    (2, 4, 6, 3)
    """
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        if frames.ndim == 5:
            raise ValueError(
                f"Expected the frames of one video, but got a batch of shape {tuple(frames.shape)}: pass frames[0]."
            )
        items = list(frames)
    elif isinstance(frames, Sequence) and not isinstance(frames, (str, bytes)):
        items = list(frames)
    else:
        raise TypeError(f"Expected a list of frames, an array or a tensor, but got {type(frames).__name__}.")
    if not items:
        raise ValueError("Expected at least one frame, but got none.")
    if isinstance(items[0], (list, tuple)):
        raise ValueError("Expected the frames of one video, but got a list of videos: pass frames[0].")
    arrs = [_one(f, channels_first=isinstance(frames, torch.Tensor) or isinstance(f, torch.Tensor)) for f in items]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1 or arrs[0].ndim != 3 or arrs[0].shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Expected frames of one shape (H, W, C) with C in 1, 3, 4 (tensors: (C, H, W)), but got {sorted(shapes)}."
        )
    video = np.stack(arrs)  # (F, H, W, C)
    if video.dtype != np.uint8:
        if not np.issubdtype(video.dtype, np.floating):
            raise ValueError(f"Expected uint8 or float frames in [0, 1], but got dtype {video.dtype}.")
        video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    return video


def _check_fps(fps: float) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 240:
        raise ValueError(f"Expected fps in (0, 240], but got {fps!r}.")
    return float(fps)


def _imageio_ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise ImportError(
            'Expected imageio-ffmpeg for MP4 export, but it is not installed: pip install "memctl[video]" '
            "(or imageio-ffmpeg); GIF export needs only Pillow."
        ) from e
    return imageio_ffmpeg


def _write_h264(path: str | os.PathLike, video: np.ndarray, fps: float, **options) -> None:
    """The one H.264 writer: `(F, H, W, 3)` uint8 frames at their exact size (`macro_block_size=1`)."""
    h, w = video.shape[1:3]
    writer = _imageio_ffmpeg().write_frames(str(path), (w, h), fps=fps, codec="libx264", macro_block_size=1, **options)
    writer.send(None)
    try:
        for frame in video:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def export_mp4(
    frames: Any, path: str | os.PathLike, fps: float = 8, comment: str | None = None, quality: float = 8
) -> Path:
    """Write H.264 MP4 at the frames' exact size; `comment` goes into the file's metadata. Returns the path."""
    fps = _check_fps(fps)
    _imageio_ffmpeg()  # the install hint before any file is made
    video = as_uint8_frames(frames)[..., :3]  # (F, H, W, 3): no alpha in H.264
    h, w = video.shape[1:3]
    params = ["-metadata", f"comment={comment}"] if comment else []
    with atomic_path(path, parents=True, suffix=Path(path).suffix) as tmp:
        _write_h264(tmp, video, fps, quality=quality, output_params=params,
                    pix_fmt_out="yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p")  # fmt: skip
    return Path(path)


def encode_mp4(frames: np.ndarray, fps: int, comment: dict) -> bytes:
    """Reproducible H.264 MP4 bytes (bitexact flags, yuv420p) of `(F, H, W, 3)` uint8 frames with `comment` as
    JSON in the container's metadata: what `memctl render` writes."""
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"Expected even frame width and height for yuv420p H.264, but got {w}x{h}.")
    params = ["-metadata", "comment=" + json.dumps(comment, sort_keys=True)]
    params += ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-movflags", "+faststart"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        _write_h264(path, frames, fps, ffmpeg_log_level="error", output_params=params)
        return path.read_bytes()


def read_mp4_comment(path: str | os.PathLike) -> dict | None:
    """The JSON `comment` that `encode_mp4` embedded, read back with the bundled ffmpeg."""
    cmd = [_imageio_ffmpeg().get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    value = re.search(r"^comment=((?:\\.|[^\\\n])*)$", text, re.M)
    return json.loads(re.sub(r"\\(.)", r"\1", value.group(1))) if value else None


def export_gif(
    frames: Any, path: str | os.PathLike, fps: float = 8, comment: str | None = None, loop: int = 0
) -> Path:
    """Write an animated GIF (Pillow; `loop=0` loops forever) at the frames' exact size. Returns the path."""
    fps = _check_fps(fps)
    images = [Image.fromarray(f) for f in as_uint8_frames(frames)]
    extra = {"comment": comment} if comment else {}
    with atomic_path(path, parents=True, suffix=Path(path).suffix) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                       loop=loop, optimize=False, **extra)  # fmt: skip
    return Path(path)
