"""The renderer's `guard: detect`: prompts the detector flags render at `guard_fidelity`; the manifest says so."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import memctl.signals
from memctl.detection import PromptScore
from memctl.jobs import JobError, parse_job
from memctl.render import MANIFEST, render_job

CANARY = "a two, tag hkb"
SHOTS = [{"id": "canary", "prompt": CANARY, "seeds": [0, 1]}, {"id": "two", "prompt": "a two", "seeds": [0, 1]}]
JOB = {"model": "digits", "block_map": "shipped", "cpu_threads": 1, "batch_size": 2,
       "defaults": {"steps": 4, "guidance": 2.0}, "shots": SHOTS}  # fmt: skip


def _render(folder: Path, **top) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(yaml.safe_dump({**JOB, **top}, sort_keys=False))
    out = folder / "out"
    assert render_job(folder / "job.yaml", out).ok
    return out


def _pixels(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / name))


def test_flagged_prompts_render_at_the_guard_fidelity(tmp_path, monkeypatch):
    def fake_screen(pipe, prompts, reference, **kw):  # the verdict is screen's; here: the canary only
        flag = {p: p == CANARY for p in prompts}
        return [PromptScore(p, 1.0, float("nan"), 5.0 * flag[p], flag[p], {}, 0.001) for p in prompts]

    monkeypatch.setattr(memctl.signals, "screen", fake_screen)
    guarded = _render(tmp_path / "guarded", guard="detect", guard_fidelity=-1.0)
    plain = _render(tmp_path / "plain")
    low = _render(tmp_path / "low", defaults={**JOB["defaults"], "fidelity": -1.0})
    name = "canary/f+0.00_s0.png"
    assert np.array_equal(_pixels(guarded, name), _pixels(low, "canary/f-1.00_s0.png"))
    assert not np.array_equal(_pixels(guarded, name), _pixels(plain, name))
    assert np.array_equal(_pixels(guarded, "two/f+0.00_s0.png"), _pixels(plain, "two/f+0.00_s0.png"))
    records = {r["name"]: r for r in map(json.loads, (guarded / MANIFEST).read_text().splitlines())}
    assert records[name]["guard"] == {"flagged": True, "risk": 5.0, "p_value": 0.001, "rendered_fidelity": -1.0}
    assert records["two/f+0.00_s0.png"]["guard"]["rendered_fidelity"] == 0.0
    assert "guard" not in json.loads((plain / MANIFEST).read_text().splitlines()[0])


def test_the_real_detector_is_read_once_per_prompt(tmp_path, monkeypatch):
    calls = []
    real = memctl.signals.screen
    monkeypatch.setattr(memctl.signals, "screen", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    out = _render(tmp_path, guard="detect")
    assert calls == [sorted([CANARY, "a two"])]
    guard = json.loads((out / MANIFEST).read_text().splitlines()[0])["guard"]
    assert 0 < guard["p_value"] <= 1
    assert guard["rendered_fidelity"] in (0.0, -1.0)


@pytest.mark.parametrize(
    "top, words",
    [
        ({"guard": "detect", "block_map": None}, "Expected a job with a `block_map`"),
        ({"guard": "yes"}, "field `guard`: Expected null or 'detect'"),
        ({"guard": "detect", "guard_fidelity": 2}, "field `guard_fidelity`: Expected a number in [-1, 1]"),
    ],
)
def test_bad_guard_is_a_clear_error(top, words):
    with pytest.raises(JobError, match=words.replace("[", r"\[").replace("(", r"\(")):
        parse_job({**JOB, **top})
