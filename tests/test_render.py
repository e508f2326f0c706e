"""`memctl render`: outputs with settings, manifest, resume after SIGKILL, two processes, bad jobs, video."""

from __future__ import annotations

import doctest
import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import memctl.atomic
import memctl.grid as grid
import memctl.manifest
import memctl.render as render
import memctl.sheets
from memctl.cli import main as cli_main
from memctl.jobs import JobError, load_job
from memctl.metadata import read_png_settings
from memctl.render import encode_mp4, read_mp4_comment, render_job

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits"
JOB = {
    "model": MODEL, "cpu_threads": 1, "batch_size": 2, "defaults": {"steps": 4, "guidance": 2.0},
    "shots": [
        {"id": "seven", "prompt": "a seven", "seeds": {"start": 0, "count": 8}},
        {"id": "three", "prompt": "a three", "negative_prompt": "a seven", "seeds": [11, 12, 13, 14, 15, 16, 17]},
        {"id": "one", "prompt": "the digit one", "seeds": {"start": 40, "count": 9}, "name": "ones/{seed:03d}"},
    ],
}  # fmt: skip
N = 24


def write_job(folder: Path, data: dict | None = None, name: str = "job.yaml", **top) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump({**(data or JOB), **top}, sort_keys=False))
    return path


def files(out: Path) -> dict[str, bytes]:
    """Every file under `out` except the manifest: relative name -> bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != render.MANIFEST}  # fmt: skip


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / render.MANIFEST).read_text().splitlines()]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def pipe():
    from memctl.zoo.testbed import load_testbed

    return load_testbed(MODEL).pipeline()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, render.Summary]:
    """One uninterrupted single-process run of JOB: (job file, output folder, summary)."""
    tmp = tmp_path_factory.mktemp("reference")
    job = write_job(tmp)
    summary = render_job(job, tmp / "out")
    return job, tmp / "out", summary


def test_outputs_manifest_and_embedded_settings(reference, pipe):
    _, out, summary = reference
    assert summary.ok
    assert len(summary.done) == N
    assert not summary.skipped
    made = files(out)
    sheets = sorted(n for n in made if n.endswith(".contact.png"))
    assert sheets == ["one.contact.png", "seven.contact.png", "three.contact.png"]
    assert summary.sheets == [
        out / n for n in ("seven.contact.png", "three.contact.png", "one.contact.png")]  # fmt: skip
    made = {n: b for n, b in made.items() if n not in sheets}
    assert len(made) == N, sorted(made)
    assert all(n.endswith(".png") for n in made), sorted(made)
    assert "ones/040.png" in made
    assert "three/f+0.00_s11.png" in made
    records = manifest(out)
    assert [r["name"] for r in records] == sorted(made)
    for r in records:
        assert r["sha256"] == hashlib.sha256(made[r["name"]]).hexdigest()
        assert r["bytes"] == len(made[r["name"]])
        assert set(r["versions"]) == {"memctl", "diffusers", "torch"}
        assert r["time"].endswith("+00:00")
        assert r["model"]["spec"] == MODEL
        assert r["model"]["fingerprints"]["unet"]
        assert r["block_map"] is None
        embedded = read_png_settings(out / r["name"])
        assert embedded["memctl"]["seed"] == r["settings"]["seed"]
        assert embedded["memctl"]["prompt"] == r["settings"]["prompt"]
        assert embedded["memctl"]["model"] == r["model"]
        assert f"Seed: {r['settings']['seed']}" in embedded["parameters"]
    three = read_png_settings(out / "three/f+0.00_s12.png")
    assert "Negative prompt: a seven" in three["parameters"]
    assert three["memctl"]["steps"] == 4
    # Each image is its seed's own: the same pixels as a direct call with that seed's generator, batched as the job.
    direct = pipe(["a three"] * 2, negative_prompt=["a seven"] * 2, num_inference_steps=4, guidance_scale=2.0,
                  generator=[torch.Generator().manual_seed(s) for s in (11, 12)]).images  # fmt: skip
    for image, seed in zip(direct, (11, 12), strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(out / f"three/f+0.00_s{seed}.png")))


def test_rerun_skips_verified_outputs_and_force_redoes(reference, tmp_path: Path, pipe):
    job, ref, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    inodes = {p: p.stat().st_ino for p in out.rglob("*.png")}
    again = render_job(job, out, pipeline=pipe)
    assert (len(again.done), len(again.skipped)) == (0, N)
    assert {p: p.stat().st_ino for p in out.rglob("*.png")} == inodes  # not rewritten
    (out / "seven/f+0.00_s3.png").write_bytes(b"corrupt")
    (out / "ones/041.png").unlink()
    repaired = render_job(job, out, pipeline=pipe)
    assert repaired.done == ["ones/041.png", "seven/f+0.00_s3.png"]
    assert len(repaired.skipped) == N - 2
    assert files(out) == files(ref)
    forced = render_job(job, out, force=True, pipeline=pipe)
    assert len(forced.done) == N
    assert files(out) == files(ref)
    assert len(manifest(out)) == N


def test_sigkill_midway_then_rerun_equals_uninterrupted(reference, tmp_path: Path):
    job, ref, _ = reference
    out = tmp_path / "out"
    part = out / render.STATE_DIR / "manifest.part-0.jsonl"
    # The child blocks on an event once its 6th record is in the manifest but before that file's rename (the worst
    # moment to die), says so, and is killed there: no poll races the render.
    code = (
        "import sys, threading\n"
        "import memctl.render as r\n"
        "append, calls = r._append_line, []\n"
        "def blocking(path, record):\n"
        "    append(path, record)\n"
        "    calls.append(record)\n"
        "    if len(calls) == 6:\n"
        "        print('blocked', flush=True)\n"
        "        threading.Event().wait()\n"
        "r._append_line = blocking\n"
        "from memctl.cli import main\n"
        f"sys.exit(main(['render', {str(job)!r}, '--out', {str(out)!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline() == "blocked\n", f"the render ended first (exit code {proc.wait()})"
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    assert part.read_text().count("\n") == 6
    assert len(list(out.rglob(f"*{render._TEMP_MARK}*.part"))) == 1  # the 6th output, never renamed
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")}
    assert len(before) == 5
    summary = render_job(job, out)
    assert len(summary.skipped) == len(before)
    assert len(summary.done) == N - len(before)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before  # nothing rendered twice
    assert files(out) == files(ref)  # byte for byte; no temp files left
    assert [r["name"] for r in manifest(out)] == [r["name"] for r in manifest(ref)]
    assert [r["sha256"] for r in manifest(out)] == [r["sha256"] for r in manifest(ref)]


def test_two_processes_equal_one(reference, tmp_path: Path):
    job, ref, _ = reference
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `accelerate launch --cpu --num_processes 2` starts one process unless mpirun is set up; `--multi_gpu` uses
    # torchrun's launcher, which on a machine without GPUs runs the processes on CPU with gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "memctl", "render", str(job), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("memctl render:") == 1  # one summary, from the main process
    assert files(out) == files(ref)
    records = manifest(out)
    outputs = sorted(n for n in files(ref) if not n.endswith(".contact.png"))  # the sheets are in no manifest
    assert [r["name"] for r in records] == outputs
    assert len(records) == N  # complete, no duplicates
    assert {r["process"] for r in records} == {0, 1}


def test_failing_shot_does_not_stop_the_others(tmp_path: Path, capsys, monkeypatch):
    encode = render.Renderer.encode

    def fail_on_shot_broken(self, batch):
        if batch[0].shot == "broken":
            raise ValueError("Expected a working shot, but this one breaks.")
        return encode(self, batch)

    monkeypatch.setattr(render.Renderer, "encode", fail_on_shot_broken)
    shots = [{"id": "broken", "prompt": "a seven", "seeds": [0]}, JOB["shots"][0]]
    job = write_job(tmp_path, {**JOB, "shots": shots})
    assert cli_main(["render", str(job), "--out", str(tmp_path / "out")]) == 1
    text = capsys.readouterr().out
    assert "8 done, 0 skipped (already done), 1 failed" in text
    assert "failed broken/f+0.00_s0.png: ValueError: Expected a working shot" in text
    assert [r["shot"] for r in manifest(tmp_path / "out")] == ["seven"] * 8


def test_prompt_past_the_tokenizer_is_refused_before_rendering(tmp_path: Path, pipe):
    long = " ".join(["seven"] * 100)
    shots = [
        {"id": "long", "prompt": long, "seeds": [0]},
        {**JOB["shots"][0], "negative_prompt": " ".join(["seven"] * 1000)},
    ]
    with pytest.raises(JobError) as info:
        render_job(write_job(tmp_path, {**JOB, "shots": shots}), tmp_path / "out", pipeline=pipe)
    assert info.value.errors == [
        "shots[0] (id 'long'), field `prompt`: Expected at most 32 tokens (with start and end: this model's text "
        "encoder sees no further), but got 102 for 'seven seven seven seven seven seven seven seven seven seven "
        "seven seven seven …' (599 characters). Shorten it.",
        "shots[1] (id 'seven'), field `negative_prompt`: Expected at most 32 tokens (with start and end: this "
        "model's text encoder sees no further), but got 1002 for 'seven seven seven seven seven seven seven seven "
        "seven seven seven seven seven …' (5999 characters). Shorten it.",
    ]
    assert not (tmp_path / "out" / "long").exists()
    assert not (tmp_path / "out" / render.MANIFEST).exists()


def test_disk_full_fails_cleanly(tmp_path: Path, monkeypatch, pipe):
    def half_then_full(f, data: bytes) -> None:
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(render, "_write_bytes", half_then_full)
    out = tmp_path / "out"
    summary = render_job(write_job(tmp_path), out, pipeline=pipe)
    assert not summary.done
    assert len(summary.failed) == N
    reasons = dict(summary.failed)
    assert reasons["seven/f+0.00_s0.png"] == "OSError: No space left on device while writing seven/f+0.00_s0.png"
    assert reasons["ones/040.png"].startswith("not attempted: OSError: No space left on device")
    assert files(out) == {}
    assert manifest(out) == []  # no partial files, no temp files, no empty shot folders
    assert sorted(p.name for p in out.iterdir()) == [".memctl", "manifest.jsonl"]


def _other_model_map(tmp_path: Path) -> str:
    from memctl.blockmap import BlockMap
    from memctl.blocks import find_blocks
    from tests.tiny import build

    model, _ = build("sd")
    BlockMap.from_scores(model, {find_blocks(model)[0].name: 0.5}).save(tmp_path / "other.safetensors")
    return "other.safetensors"


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a block map")


BAD = {
    "missing field": lambda tmp: {**JOB, "shots": [{"id": "a", "seeds": [0]}]},
    "wrong type": lambda tmp: {**JOB, "shots": [{**JOB["shots"][0], "steps": "four"}]},
    "unknown field": lambda tmp: {**JOB, "shots": [{**JOB["shots"][0], "sampler": "ddim"}]},
    "path traversal": lambda tmp: {**JOB, "shots": [{**JOB["shots"][0], "name": "../../{seed}"}]},
    "missing map": lambda tmp: {**JOB, "block_map": "nowhere.safetensors"},
    "unreadable map": lambda tmp: _garbage(tmp / "bad.safetensors") or {**JOB, "block_map": "bad.safetensors"},
    "map for another model": lambda tmp: {**JOB, "block_map": _other_model_map(tmp)},
    "size the model cannot make": lambda tmp: {**JOB, "shots": [{**JOB["shots"][0], "size": 32}]},
    "frames on an image model": lambda tmp: {**JOB, "shots": [{**JOB["shots"][0], "frames": 4}]},
    "unknown model": lambda tmp: {**JOB, "model": "no-such-model"},
}  # fmt: skip
WORDS = {"missing field": "field `prompt`", "wrong type": "but got 'four'", "unknown field": "field `sampler`",
         "path traversal": "inside the output folder", "missing map": "does not exist",
         "unreadable map": "Expected a readable block map", "map for another model": "made for a different model",
         "size the model cannot make": "field `size`", "frames on an image model": "field `frames`",
         "unknown model": "field `model`"}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_job_is_a_clear_error_and_writes_nothing(case: str, tmp_path: Path, capsys):
    job = write_job(tmp_path, BAD[case](tmp_path))
    out = tmp_path / "out"
    assert cli_main(["render", str(job), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"memctl render: error: {job} is not a valid job" in err, err
    assert WORDS[case] in err, err
    assert "Expected" in err
    assert "but" in err
    assert not out.exists()


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path, pipe):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "seven").symlink_to(outside)
    with pytest.raises(ValueError, match="Expected every output inside"):
        render_job(write_job(tmp_path), out, pipeline=pipe)
    assert not any(outside.iterdir())
    assert not (out / render.MANIFEST).exists()


def test_block_map_sweep(tmp_path: Path, pipe):
    from memctl.blockmap import BlockMap
    from memctl.blocks import find_blocks

    bmap = BlockMap.from_scores(pipe.unet, {b.name: (-1.0) ** i for i, b in enumerate(find_blocks(pipe.unet))})
    bmap.save(tmp_path / "map.safetensors")
    shot = {"id": "seven", "prompt": "a seven", "seeds": [0, 1], "fidelity": {"from": -1, "to": 1, "count": 3}}
    out = tmp_path / "out"
    summary = render_job(write_job(tmp_path, {**JOB, "block_map": "map.safetensors", "shots": [shot]}), out)
    assert summary.ok
    assert len(summary.done) == 6
    records = {r["name"]: r for r in manifest(out)}
    assert records["seven/f-1.00_s0.png"]["block_map"] == {"spec": "map.safetensors",
                                                            "fingerprints": bmap.fingerprints}  # fmt: skip
    assert "Block map: map.safetensors" in read_png_settings(out / "seven/f+1.00_s1.png")["parameters"]

    def pixels(name: str) -> np.ndarray:
        return np.asarray(Image.open(out / name))

    plain_out = tmp_path / "plain" / "out"
    plain = render_job(write_job(tmp_path / "plain"), plain_out, pipeline=pipe)
    assert plain.ok
    assert np.array_equal(pixels("seven/f+0.00_s0.png"), np.asarray(Image.open(plain_out / "seven/f+0.00_s0.png")))
    assert not np.array_equal(pixels("seven/f+1.00_s0.png"), pixels("seven/f+0.00_s0.png"))
    assert not np.array_equal(pixels("seven/f-1.00_s0.png"), pixels("seven/f+0.00_s0.png"))
    # The contact sheet: seeds (rows) x fidelities (columns, -1 first), each 16 px image enlarged 8x (nearest).
    assert summary.sheets == [out / "seven.contact.png"]
    assert "contact sheets" in summary.text()
    sheet = np.asarray(Image.open(out / "seven.contact.png").convert("RGB"))
    cell, pad, top, left = render.SHEET_CELL, grid.PAD, 28 + 22, 110  # memctl.grid's layout: title, header, labels
    assert sheet.shape[0] == top + 2 * (cell + pad) + pad
    for i, seed in enumerate([0, 1]):
        for j, fid in enumerate(["-1.00", "+0.00", "+1.00"]):
            image = Image.open(out / f"seven/f{fid}_s{seed}.png").convert("RGB").resize((cell, cell), Image.NEAREST)
            y, x = top + i * (cell + pad) + pad, left + j * (cell + pad) + pad
            assert np.array_equal(sheet[y : y + cell, x : x + cell], np.asarray(image)), (seed, fid)
    before = (out / "seven.contact.png").stat().st_ino
    (out / "seven/f+1.00_s1.png").unlink()  # a missing output: an empty cell, and the sheet is rewritten
    assert render.write_contact_sheets(out, load_job(tmp_path / "job.yaml")) == [out / "seven.contact.png"]
    changed = np.asarray(Image.open(out / "seven.contact.png").convert("RGB"))
    y, x = top + cell + 2 * pad, left + 2 * (cell + pad) + pad
    assert (changed[y : y + cell, x : x + cell] == 255).all()
    assert (out / "seven.contact.png").stat().st_ino != before


class FakeVideoPipe:
    """A video pipeline's calling convention on synthetic frames: each clip from its own generator."""

    def __init__(self):
        self.transformer = torch.nn.Linear(2, 2)
        with torch.no_grad():
            for i, p in enumerate(self.transformer.parameters()):
                p.fill_(i)  # the same model, so the same fingerprint, in every instance

    def __call__(self, prompt, num_inference_steps, guidance_scale, generator, num_frames, output_type="np",
                 negative_prompt=None, height=None, width=None):  # fmt: skip
        h, w = height or 8, width or 8
        clips = [torch.rand((num_frames, h, w, 3), generator=g).numpy() for g in generator]  # (F, H, W, C)
        return SimpleNamespace(frames=np.stack(clips))


def test_mp4_round_trip_on_synthetic_frames(tmp_path: Path):
    pytest.importorskip("imageio_ffmpeg")
    frames = (np.arange(4 * 6 * 10 * 3) % 251).astype(np.uint8).reshape(4, 6, 10, 3)
    comment = {"seed": 3, "prompt": 'rain; wind = "on"\nnight #2 \\ end'}
    blob = encode_mp4(frames, fps=5, comment=comment)
    assert blob[4:8] == b"ftyp"
    assert blob == encode_mp4(frames, fps=5, comment=comment)  # deterministic bytes
    path = tmp_path / "v.mp4"
    path.write_bytes(blob)
    assert read_mp4_comment(path) == comment
    with pytest.raises(ValueError, match="even frame width and height"):
        encode_mp4(frames[:, :5], fps=5, comment={})


def test_video_job(tmp_path: Path):
    pytest.importorskip("imageio_ffmpeg")
    shot = {"id": "clip", "prompt": "rain", "seeds": [1, 2, 3], "frames": 5, "fps": 10, "size": [12, 8]}
    job = write_job(tmp_path, {**JOB, "shots": [shot]})
    first = render_job(job, tmp_path / "a", pipeline=FakeVideoPipe())
    assert first.ok
    assert first.done == ["clip/f+0.00_s1.mp4", "clip/f+0.00_s2.mp4", "clip/f+0.00_s3.mp4"]
    comment = read_mp4_comment(tmp_path / "a/clip/f+0.00_s2.mp4")
    assert comment["seed"] == 2
    assert comment["frames"] == 5
    assert comment["size"] == [12, 8]
    assert {r["kind"] for r in manifest(tmp_path / "a")} == {"mp4"}
    render_job(job, tmp_path / "b", pipeline=FakeVideoPipe())
    assert files(tmp_path / "a") == files(tmp_path / "b")
    with pytest.raises(JobError, match="field `frames`: Expected `frames` \\(this model makes videos\\)"):
        render_job(write_job(tmp_path / "img"), tmp_path / "img" / "out", pipeline=FakeVideoPipe())


def test_example_job_renders(tmp_path: Path, pipe):
    from memctl.blockmap import BlockMap
    from memctl.blocks import find_blocks
    from memctl.zoo.testbed import load_testbed

    data = yaml.safe_load((ROOT / "assets" / "example-job.yaml").read_text())
    if not (load_testbed("digits").path / "blockmap.safetensors").is_file():  # until the shipped map exists
        BlockMap.from_scores(pipe.unet, {find_blocks(pipe.unet)[0].name: 1.0}).save(tmp_path / "map.safetensors")
        data["block_map"] = "map.safetensors"
    data["defaults"]["steps"] = 2
    summary = render_job(write_job(tmp_path, data), tmp_path / "out", pipeline=pipe)
    assert summary.ok
    assert len(summary.done) == 58  # 20 canary + 20 seven + 10 three + 8 zero
    assert "baseline/zero-baseline_0107.png" in summary.done
    assert "seven/f-0.50_s3.png" in summary.done


SMALL = {"model": MODEL, "cpu_threads": 1, "defaults": {"steps": 2},
         "shots": [{"id": "seven", "prompt": "a seven", "seeds": [0, 1]}]}  # fmt: skip
SMALL_NAMES = ["seven/f+0.00_s0.png", "seven/f+0.00_s1.png"]


def test_out_that_is_a_file_or_unwritable_is_a_clear_error(tmp_path: Path, monkeypatch, capsys):
    job = write_job(tmp_path, SMALL)
    (tmp_path / "file").write_text("mine")
    assert cli_main(["render", str(job), "--out", str(tmp_path / "file")]) == 2
    assert (
        f"memctl render: error: Expected --out {tmp_path / 'file'} to be a folder, but it is a file."
        in capsys.readouterr().err
    )
    assert (tmp_path / "file").read_text() == "mine"
    real_open = os.open

    def read_only(path, *args, **kwargs):  # as a read-only folder answers (root ignores chmod, so simulate it)
        if str(path).endswith(render.LOCK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert cli_main(["render", str(job), "--out", str(tmp_path / "ro")]) == 2
    assert "Expected a writable output folder at" in capsys.readouterr().err


def test_second_render_into_one_out_is_refused(tmp_path: Path, pipe):
    job, out = write_job(tmp_path, SMALL), tmp_path / "out"
    with render.lock_out(out):
        with pytest.raises(ValueError, match="another memctl render is writing into it"):
            render_job(job, out, pipeline=pipe)
        assert not (out / "seven").exists()
    assert render_job(job, out, pipeline=pipe).done == SMALL_NAMES
    assert not (out / render.STATE_DIR / render.LOCK).exists()  # released and removed


@pytest.mark.parametrize("text", ['{"id": 1, "note": "another tool"}\n', "my notes\nnot json\n"])
def test_foreign_manifest_is_refused_not_rewritten(tmp_path: Path, pipe, text: str):
    out = tmp_path / "out"
    out.mkdir()
    (out / render.MANIFEST).write_text(text)
    with pytest.raises(ValueError, match=r"manifest.jsonl to be memctl's manifest"):
        render_job(write_job(tmp_path, SMALL), out, pipeline=pipe)
    assert (out / render.MANIFEST).read_text() == text
    assert not (out / "seven").exists()


def test_foreign_line_among_memctl_records_is_refused(tmp_path: Path, pipe):
    job, out = write_job(tmp_path, SMALL), tmp_path / "out"
    render_job(job, out, pipeline=pipe)
    path = out / render.MANIFEST
    path.write_text(path.read_text() + '{"note": "mine"}\n')
    with pytest.raises(ValueError, match=r"line 3 is JSON of another kind"):
        render_job(job, out, pipeline=pipe)


def test_undecodable_manifest_line_is_skipped_with_a_warning(tmp_path: Path, pipe):
    job, out = write_job(tmp_path, SMALL), tmp_path / "out"
    render_job(job, out, pipeline=pipe)
    path = out / render.MANIFEST
    first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(first + b"\xff\xfe{not utf-8\n" + second)
    with pytest.warns(UserWarning, match=rf"{path}, line 2: skipped \(expected a JSON record of memctl render"):
        again = render_job(job, out, pipeline=pipe)
    assert again.skipped == SMALL_NAMES
    assert not again.done  # one bad byte no longer blocks the resume


def test_files_memctl_did_not_write_are_kept(tmp_path: Path, pipe):
    """A user's file at an output name stops the run (unless --force); only our own stale temp files are removed."""
    job, out = write_job(tmp_path, SMALL), tmp_path / "out"
    (out / "seven").mkdir(parents=True)
    (out / "seven/f+0.00_s1.png").write_bytes(b"my picture")
    theirs = [out / ".notes.abcdefgh.part", out / "seven/.f+0.00_s0.png.abcdefgh.part",
              out / "seven/.other.png.memctl-abcdefgh.part"]  # fmt: skip
    for path in theirs:
        path.write_text("keep me")
    ours = out / "seven/.f+0.00_s0.png.memctl-k2j4h5g6.part"  # what a killed render of this job leaves
    ours.write_text("stale")
    with pytest.raises(ValueError, match=r"but .* has seven/f\+0.00_s1.png, which manifest.jsonl does not list"):
        render_job(job, out, pipeline=pipe)
    assert (out / "seven/f+0.00_s1.png").read_bytes() == b"my picture"
    forced = render_job(job, out, force=True, pipeline=pipe)
    assert forced.done == SMALL_NAMES
    assert (out / "seven/f+0.00_s1.png").read_bytes()[:4] == b"\x89PNG"
    assert all(p.read_text() == "keep me" for p in theirs)
    assert not ours.exists()


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o077, 0o600)])
def test_outputs_respect_the_umask(tmp_path: Path, pipe, umask: int, mode: int):
    old = os.umask(umask)
    try:
        render_job(write_job(tmp_path, SMALL), tmp_path / "out", pipeline=pipe)
    finally:
        os.umask(old)
    assert (tmp_path / "out/seven/f+0.00_s0.png").stat().st_mode & 0o777 == mode
    assert (tmp_path / "out" / render.MANIFEST).stat().st_mode & 0o777 == mode


def test_disk_full_at_the_manifest_keeps_the_summary_and_the_records(tmp_path: Path, monkeypatch, pipe, capsys):
    def full(f, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    job, out = write_job(tmp_path, SMALL), tmp_path / "out"
    monkeypatch.setattr(memctl.atomic, "_write", full)  # everything but the outputs: manifest, contact sheets
    summary = render_job(job, out, pipeline=pipe)
    text = capsys.readouterr().out
    assert summary.done == SMALL_NAMES
    assert [n for n, _ in summary.failed] == [render.MANIFEST]
    assert "2 done, 0 skipped (already done), 1 failed" in text
    assert "not rewritten (OSError: No space left" in text
    assert (out / render.STATE_DIR / "manifest.part-0.jsonl").is_file()  # the records wait for the next run
    monkeypatch.undo()
    again = render_job(job, out, pipeline=pipe)
    assert again.ok
    assert again.skipped == SMALL_NAMES
    assert [r["name"] for r in manifest(out)] == SMALL_NAMES


def test_fuzzed_jobs_never_touch_what_memctl_did_not_write(tmp_path: Path, pipe):
    """30 seeded mutations of a small job rendered into an --out holding the user's files: a clean error or a
    render; the user's files in --out and everything outside it stay as they were."""
    import random

    from tests.test_jobs import _mutate

    out = tmp_path / "out"
    theirs = {out / "notes.txt": b"mine", out / "seven/mine.png": b"my picture",
              out / ".draft.abcdefgh.part": b"half", tmp_path / "outside.txt": b"next door"}  # fmt: skip
    for path, data in theirs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    text = yaml.safe_dump(SMALL, sort_keys=False)
    rng, outcomes = random.Random(16), {"error": 0, "rendered": 0}
    for k in range(30):
        mutated = _mutate(rng, text, SMALL)
        job = tmp_path / "jobs" / f"job{k}.yaml"
        job.parent.mkdir(exist_ok=True)
        job.write_text(mutated if isinstance(mutated, str) else yaml.safe_dump(mutated), errors="surrogateescape")
        try:
            summary = render_job(job, out, pipeline=pipe)
            outcomes["rendered"] += 1
            assert all((out / n).is_file() for n in summary.done), k
        except ValueError as err:  # JobError is a ValueError
            outcomes["error"] += 1
            assert "Expected" in str(err), (k, str(err)[:300])
        assert {p: p.read_bytes() for p in theirs} == theirs, k
        assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs", "out", "outside.txt"], k
    assert outcomes["error"] >= 5, outcomes
    assert outcomes["rendered"] >= 5, outcomes


@pytest.mark.parametrize("module", [memctl.atomic, memctl.manifest, memctl.sheets], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.failed == 0
    assert result.attempted > 0


def test_atomic_write_failure_leaves_nothing(tmp_path: Path):
    def half_then_fail(f, data: bytes) -> None:
        f.write(data[:2])
        raise OSError(errno.EIO, "simulated")

    with pytest.raises(OSError, match="simulated"):
        memctl.atomic.atomic_write(tmp_path / "a" / "b" / "c.bin", b"abcdef", write=half_then_fail)
    assert list(tmp_path.iterdir()) == []  # no temp file, and the folders this call made are gone


def test_example_video_job_renders_clips_at_the_testbeds_size(tmp_path: Path):
    """assets/example-video-job.yaml on the shipped moving-digits (steps cut to 2, one seed per shot): MP4s of
    9 frames at 16x16 (size null: the testbed's own, not the pipeline's default), settings in each comment."""
    import imageio.v3 as iio

    from memctl.video import read_mp4_comment

    data = yaml.safe_load((ROOT / "assets" / "example-video-job.yaml").read_text())
    data["defaults"]["steps"] = 2
    for shot in data["shots"]:
        shot["seeds"] = [0]
    summary = render_job(write_job(tmp_path, data), tmp_path / "out")
    assert summary.ok and len(summary.done) == 6  # 2 shots x 3 fidelities
    clip = tmp_path / "out" / "canary-six" / "f-1.00_s0.mp4"
    assert iio.imread(clip).shape[:3] == (9, 16, 16)
    comment = read_mp4_comment(clip)
    assert comment["fidelity"] == -1.0 and comment["prompt"] == "a six moving up, fast"
