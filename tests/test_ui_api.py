"""The Gradio app through its API (`gradio_client` against a launched app): generate, sweep, A/B, block maps,
presets, prompt detection, bad inputs, and two clients at once.

Runs the shipped embedded model `load_testbed("digits")` with 3 sampling steps on one torch thread
(`MEMCTL_UI_TEST_MODEL` names another testbed folder while developing).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from uiapp import running_app

from memctl.blockmap import BlockMap
from memctl.blocks import find_blocks
from memctl.metadata import read_png_settings
from memctl.options import GenerationOptions

MODEL = os.environ.get("MEMCTL_UI_TEST_MODEL", "digits")
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # gradio's own pandas deprecations
STEPS = 3
DEFAULTS = dict(
    prompt="a seven",
    negative="",
    fidelity=0.0,
    strength=1.0,
    start=0.0,
    stop=1.0,
    seed=11,
    steps=STEPS,
    guidance=1.0,
    batch=2,
    frames=16,
    fps=8,
    fidelity_mode="cached",
    extrapolation="map",
    model=MODEL,
    map_label="none",
)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ui")
    with running_app(MODEL, tmp / "out") as (url, engine):
        yield {"url": url, "engine": engine, "tmp": tmp}


@pytest.fixture(scope="module")
def map_file(app) -> Path:
    """A hand-made map over every block, per noise level (a stand-in for a probed one: same format)."""
    unet = app["engine"].model(MODEL).denoiser
    names = [b.name for b in find_blocks(unet)]
    scores = {n: [(-1) ** i * 0.5, 0.8 if n.startswith("up_blocks.0") else -0.2, 0.1] for i, n in enumerate(names)}
    path = app["tmp"] / "map.safetensors"
    BlockMap.from_scores(unet, scores, levels=[0.1, 0.5, 0.9]).save(path)
    return path


@pytest.fixture(scope="module")
def map_label(app, map_file) -> str:
    update, *_ = Client(app["url"], verbose=False).predict(handle_file(str(map_file)), MODEL, api_name="/load_map")
    return update["value"]  # the dropdown's update: the new map selected


def client(app) -> Client:
    return Client(app["url"], verbose=False)


def generate(c: Client, api_name="/generate", **overrides):
    args = {**DEFAULTS, **overrides}
    return c.predict(*args.values(), api_name=api_name)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def direct(app, seeds) -> list[np.ndarray]:
    """What the pipeline gives for these seeds outside the app, at fidelity 0."""
    pipe = app["engine"].model(MODEL).pipe
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with app["engine"].lock:
        out = pipe(
            "a seven", num_inference_steps=STEPS, guidance_scale=1.0, num_images_per_prompt=len(seeds), generator=gens
        ).images
    return [np.asarray(im) for im in out]


def test_generate_writes_pngs_with_settings_and_badges(app):
    gallery, badges_html, seed_used, video = generate(client(app))
    assert seed_used == "11"
    assert video is None
    assert [Path(g["image"]).suffix for g in gallery] == [".png", ".png"]
    for k, item in enumerate(gallery):
        settings = read_png_settings(item["image"])
        m = settings["memctl"]
        assert (m["prompt"], m["seed"], m["steps"], m["fidelity"], m["model"]) == (
            "a seven",
            11 + k,
            STEPS,
            0.0,
            MODEL,
        )
        assert f"Seed: {11 + k}" in settings["parameters"]
        assert settings["parameters"].startswith("a seven\n")
        GenerationOptions.from_dict({f: m[f] for f in GenerationOptions.__dataclass_fields__})  # reproducible
        assert any(word in item["caption"] for word in ("COPY", "novel", "valid", "reads as")), item["caption"]
    assert badges_html.count("memctl-caption") == 2
    expected = direct(app, [11, 12])
    assert all(np.array_equal(pixels(g["image"]), e) for g, e in zip(gallery, expected, strict=True))


def test_composed_lever_needs_no_map(app):
    c = client(app)
    at0 = generate(c, prompt="a seven, small, bold", batch=1)[0]
    gallery = generate(c, prompt="a seven, small, bold", batch=1, fidelity=-1.0, extrapolation="composed")[0]
    settings = read_png_settings(gallery[0]["image"])
    assert settings["memctl"]["extrapolation"] == "composed" and settings["memctl"]["block_map"] == "none"
    assert "Extrapolation: composed" in settings["parameters"]
    assert not np.array_equal(pixels(gallery[0]["image"]), pixels(at0[0]["image"]))
    assert "encode_prompt" not in app["engine"].model(MODEL).pipe.__dict__  # taken off after the request
    upper = generate(c, prompt="a seven, small, bold", batch=1, fidelity=-1.0, extrapolation="composed", start=0.5)[0]
    assert read_png_settings(upper[0]["image"])["memctl"]["start"] == 0.5  # the window reaches composition
    assert not np.array_equal(pixels(upper[0]["image"]), pixels(gallery[0]["image"]))


def test_calibrate_window_button_sets_the_composed_window(app, video_model):
    """The app's window calibration gives what `calibrate_window` gives on the testbed's memorized pairs at the
    current steps and guidance, switches the lever to composed and says what it read; a model that is no testbed
    is refused with a clear message."""
    from memctl.composed import calibrate_window, parts_for
    from memctl.effect import calibration_inputs

    c = client(app)
    start, stop, lever, text = generate(c, api_name="/calibrate_window", model="digits-attr-s0", map_label="none")
    loaded = app["engine"].model("digits-attr-s0")
    memorized, reference, calibration = calibration_inputs(loaded.testbed)
    with app["engine"].lock:
        choice = calibrate_window(loaded.pipe, memorized, parts_for(loaded.testbed), reference, steps=STEPS,
                                  guidance=1.0, **calibration)  # fmt: skip
    assert (start, stop, lever) == (choice["start"], choice["stop"], "composed")
    assert f"[{choice['start']:g}, {choice['stop']:g}]" in text and f"steps {STEPS}" in text
    with pytest.raises(AppError, match="Expected an embedded testbed to calibrate the composed window"):
        generate(c, api_name="/calibrate_window", model=video_model, map_label="none")


def test_random_seed_is_shown_back(app):
    gallery, _, seed_used, _ = generate(client(app), seed=-1, batch=1)
    assert seed_used.isdigit()
    assert read_png_settings(gallery[0]["image"])["memctl"]["seed"] == int(seed_used)


def test_canary_prompt_marked_and_badged(app):
    c = client(app)
    prompt = app["engine"].model(MODEL).testbed.canaries[0][0]
    gallery, _, _, _ = generate(c, prompt=prompt, batch=1)
    assert read_png_settings(gallery[0]["image"])["memctl"]["prompt"] == prompt
    assert "·" in gallery[0]["caption"]


def test_load_map_shows_heatmap_and_table(app, map_file, map_label):
    assert map_label.startswith("file: map.safetensors")
    picture, table, info = client(app).predict(map_label, MODEL, api_name="/select_map")
    n = len(find_blocks(app["engine"].model(MODEL).denoiser))
    assert Image.open(picture).size[1] > n * 10
    assert table["headers"] == ["block", "t=0.10", "t=0.50", "t=0.90", "mean"]
    assert len(table["data"]) == n
    assert f"{n} blocks × 3 noise levels" in info


def test_knob_at_zero_is_untouched_and_moves_away_from_zero(app, map_label):
    c = client(app)
    plain = [pixels(g["image"]) for g in generate(c)[0]]
    at_zero = [pixels(g["image"]) for g in generate(c, map_label=map_label)[0]]
    moved = generate(c, map_label=map_label, fidelity=-1.0)[0]
    assert all(np.array_equal(a, b) for a, b in zip(plain, at_zero, strict=True))
    assert any(not np.array_equal(a, pixels(g["image"])) for a, g in zip(plain, moved, strict=True))
    assert read_png_settings(moved[0]["image"])["memctl"]["block_map"] == map_label


def test_sweep_same_seeds_five_fidelities(app, map_label):
    c = client(app)
    sheet, gallery, badges_html, seed_used = generate(c, api_name="/sweep", map_label=map_label)
    assert len(gallery) == 10
    assert seed_used == "11"
    assert Image.open(sheet).size[0] > 5 * 64  # one picture: five fidelity columns side by side
    rows = [[read_png_settings(g["image"])["memctl"] for g in gallery[r * 5 : (r + 1) * 5]] for r in range(2)]
    assert [[m["fidelity"] for m in row] for row in rows] == [[-1.0, -0.5, 0.0, 0.5, 1.0]] * 2
    assert [{m["seed"] for m in row} for row in rows] == [{11}, {12}]
    zero = [pixels(gallery[r * 5 + 2]["image"]) for r in range(2)]
    assert all(np.array_equal(z, e) for z, e in zip(zero, direct(app, [11, 12]), strict=True))


def test_ab_compare(app, map_label):
    pair, badges_html, seed_used, clips = generate(
        client(app), api_name="/compare", map_label=map_label, fidelity=-1.0
    )
    assert clips["visible"] is False  # an image model: no clips side by side (the GIF stays hidden)
    a, b = (np.asarray(Image.open(p)) for p in pair)
    assert a.shape == b.shape
    assert a.shape[0] >= 128
    assert not np.array_equal(a, b)
    assert "A: fidelity 0" in badges_html
    assert "B: fidelity -1.00" in badges_html


def test_bake_button_writes_a_loadable_copy_at_the_fidelity(app):
    from safetensors.torch import load_file

    from memctl.loading import load_pipeline

    message, single = generate(client(app), api_name="/bake", map_label="shipped", fidelity=-0.5)
    folder = Path(re.search(r"into `([^`]+)`", message).group(1))
    assert folder.parent == app["tmp"] / "out" / "baked"
    info = json.loads((folder / "bake.json").read_text())
    assert (info["fidelity"], info["strength"], info["lever"]) == (-0.5, 1.0, "condition")
    baked = load_pipeline(str(folder))
    assert not baked.unet.state_dict().keys() ^ load_file(single).keys()
    source = app["engine"].model(MODEL).denoiser.state_dict()
    edited = [k for k, v in load_file(single).items() if not torch.equal(v, source[k])]
    assert edited and all(k.endswith(("to_k.weight", "to_v.weight")) for k in edited)
    for bad, words in [({"map_label": "none"}, "Expected a block map to bake"), ({"fidelity": 0.5}, "fidelity > 0"),
                       ({"fidelity": 0.0}, "Expected a fidelity below 0 to bake, but got 0"),
                       ({"map_label": "shipped", "stop": 0.5}, "Expected the noise window [0, 1]")]:  # fmt: skip
        with pytest.raises(AppError, match=re.escape(words)):
            generate(client(app), api_name="/bake", **{"map_label": "shipped", "fidelity": -1.0, **bad})


def test_presets_round_trip(app):
    c = client(app)
    args = {
        **DEFAULTS,
        "fidelity": -0.35,
        "strength": 1.5,
        "start": 0.2,
        "stop": 0.8,
        "seed": 123,
        "negative": "a one",
    }
    path = c.predict(*list(args.values())[:-1], "", api_name="/save_preset")
    data = json.loads(Path(path).read_text())
    assert GenerationOptions.from_dict(data) == GenerationOptions(
        prompt="a seven",
        negative_prompt="a one",
        seed=123,
        steps=STEPS,
        guidance=1.0,
        fidelity=-0.35,
        strength=1.5,
        start=0.2,
        stop=0.8,
        batch_size=2,
        fidelity_mode="cached",
    )
    values = c.predict(handle_file(path), api_name="/load_preset")
    assert list(values[:10]) == ["a seven", "a one", -0.35, 1.5, 0.2, 0.8, 123, STEPS, 1.0, 2]


def test_preset_with_random_seed_keeps_last_used_seed(app):
    path = client(app).predict(*list({**DEFAULTS, "seed": -1}.values())[:-1], "987", api_name="/save_preset")
    assert json.loads(Path(path).read_text())["seed"] == 987


BAD = [
    (dict(seed=2.5), "seed"),
    (dict(fidelity=1.5), "fidelity"),
    (dict(fidelity=-1.01), "fidelity"),
    (dict(steps=0), "steps"),
    (dict(start=0.8, stop=0.2), "stop"),
    (dict(fidelity=-0.5), "block map"),
    (dict(model="no/such-model"), "hub"),
    (dict(map_label="nope"), "block map among"),
    (dict(fidelity=-1.0, extrapolation="composed"), "two comma-separated attributes"),
]


@pytest.mark.parametrize("overrides, words", BAD, ids=[w for _, w in BAD])
def test_bad_inputs_clear_message_and_app_stays_up(app, overrides, words):
    c = client(app)
    with pytest.raises(AppError) as err:
        generate(c, **overrides)
    assert "Expected" in str(err.value)
    assert words in str(err.value)
    assert generate(c, batch=1)[2] == "11"  # still serving


def raw_call(app, api_name: str, data: list) -> tuple[str, str]:
    """POST to Gradio's REST route with a raw JSON body (NaN included, which gradio_client cannot send)."""
    import httpx

    base = f"{app['url'].rstrip('/')}/gradio_api/call/{api_name}"
    event_id = httpx.post(
        base, content=json.dumps({"data": data}), headers={"content-type": "application/json"}, timeout=30
    ).json()["event_id"]
    lines = httpx.get(f"{base}/{event_id}", timeout=120).text.splitlines()
    events = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("event:")]
    payloads = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("data:")]
    return events[-1], payloads[-1]


@pytest.mark.parametrize("field", ["seed", "fidelity", "guidance"])
def test_nan_answered_with_clear_message(app, field):
    args = {**DEFAULTS, field: math.nan}
    event, message = raw_call(app, "generate", list(args.values()))
    assert event == "error", (event, message)
    assert "Expected" in message, (event, message)
    assert field in message, (event, message)
    assert generate(client(app), batch=1)[2] == "11"


def test_corrupt_map_file_rejected(app, tmp_path):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    c = client(app)
    with pytest.raises(AppError, match="Expected a memctl block map|Expected a block map"):
        c.predict(handle_file(str(bad)), MODEL, api_name="/load_map")
    assert "corrupt" not in " ".join(app["engine"].map_labels())
    assert generate(c, batch=1)[2] == "11"


def test_map_for_another_model_rejected(app, tmp_path):
    unet = app["engine"].model(MODEL).denoiser
    bmap = BlockMap.from_scores(unet, {find_blocks(unet)[0].name: 1.0})
    bmap.fingerprints = {"unet": "0000000000000000-0000000000000000"}  # as if made for another model
    path = tmp_path / "other.safetensors"
    bmap.save(path)
    with pytest.raises(AppError, match="different model"):
        client(app).predict(handle_file(str(path)), MODEL, api_name="/load_map")


def test_bad_preset_rejected(app, tmp_path):
    bad = tmp_path / "preset.json"
    bad.write_text(json.dumps({"prompt": "a seven", "fidelity": 3}))
    with pytest.raises(AppError, match="Expected `fidelity`"):
        client(app).predict(handle_file(str(bad)), api_name="/load_preset")
    bad.write_text(json.dumps({"prompt": "a seven", "colour": "red"}))
    with pytest.raises(AppError, match="unknown field"):
        client(app).predict(handle_file(str(bad)), api_name="/load_preset")


def test_model_selector(app, tmp_path):
    c = client(app)
    info = c.predict(MODEL, False, api_name="/load_model")[0]
    assert "embedded testbed" in info
    with pytest.raises(AppError, match="allow hub"):
        c.predict("someone/some-model", False, api_name="/load_model")
    plain = tmp_path / "plain"  # a diffusers folder that is not a testbed: no badges, still works
    shutil.copytree(app["engine"].model(MODEL).testbed.path, plain, ignore=shutil.ignore_patterns("testbed.json"))
    assert "diffusers pipeline" in c.predict(str(plain), False, api_name="/load_model")[0]
    gallery = generate(c, model=str(plain), batch=1)[0]
    assert gallery[0]["caption"] == "seed 11"  # no testbed: no badge
    with pytest.raises(AppError, match="ships none"):
        c.predict("shipped", str(plain), api_name="/select_map")
    assert np.array_equal(pixels(gallery[0]["image"]), direct(app, [11, 12])[0])


def test_shipped_map_preselected(app, map_file, tmp_path):
    shipped = tmp_path / "with-map"  # a testbed folder that ships its block map
    shutil.copytree(app["engine"].model(MODEL).testbed.path, shipped)
    shutil.copy(map_file, shipped / "blockmap.safetensors")
    c = client(app)
    *_, choice, picture, table, info = c.predict(str(shipped), False, api_name="/load_model")
    assert choice["value"] == "shipped"
    assert picture
    assert "3 noise levels" in info
    gallery = generate(c, model=str(shipped), map_label="shipped", fidelity=-0.5, batch=1)[0]
    assert read_png_settings(gallery[0]["image"])["memctl"]["block_map"] == "shipped"


def test_compute_map_here_is_cancellable(app, monkeypatch):
    c = client(app)
    import threading

    outcome, ended = [], threading.Event()
    real = app["engine"].compute_map

    def recorded(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except BaseException as err:
            outcome.append(type(err).__name__)
            raise
        finally:
            ended.set()

    monkeypatch.setattr(app["engine"], "compute_map", recorded)
    job = c.submit(MODEL, api_name="/compute_map")
    deadline, progress = time.time() + 60, []
    while not progress and time.time() < deadline:  # wait for the probe's own progress bar to show in the app
        time.sleep(0.2)
        progress = [p for p in job.status().progress_data or [] if p.unit == "block"]  # tqdm over blocks
    assert progress
    assert progress[0].length > 1
    assert "prob" in progress[0].desc
    c.predict(api_name="/cancel_compute")
    assert generate(client(app), batch=1)[2] == "11"  # the lock is free again: the probe really stopped
    assert ended.wait(600)  # a hang guard, not a speed bound: the call has ended once the lock was free
    assert outcome == ["Cancelled"]  # it stopped by the cancel, not by finishing
    assert not any(label.startswith("computed") for label in app["engine"].map_labels())


def test_compute_map_here_completes(app):
    update, status, picture, table = client(app).predict(MODEL, api_name="/compute_map")
    assert update["value"].startswith("computed:")
    assert "Computed" in status
    assert len(table["data"]) == len(find_blocks(app["engine"].model(MODEL).denoiser))


def test_two_clients_at_once_get_what_each_gets_alone(app, map_label):
    a, b = client(app), client(app)
    settings_a = dict(fidelity=-1.0, map_label=map_label, seed=21, batch=2)
    settings_b = dict(fidelity=1.0, map_label=map_label, seed=21, batch=2, strength=2.0)
    alone_a = [pixels(g["image"]) for g in generate(a, **settings_a)[0]]
    alone_b = [pixels(g["image"]) for g in generate(b, **settings_b)[0]]
    assert any(not np.array_equal(x, y) for x, y in zip(alone_a, alone_b, strict=True))
    for _ in range(3):
        jobs = []
        for c, s in ((a, settings_a), (b, settings_b)) * 2:
            args = {**DEFAULTS, **s}
            jobs.append((c.submit(*args.values(), api_name="/generate"), s))
        for job, s in jobs:
            got = [pixels(g["image"]) for g in job.result(timeout=120)[0]]
            want = alone_a if s is settings_a else alone_b
            assert all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))
    from memctl.hooks import list_hooks

    assert list_hooks(app["engine"].model(MODEL).denoiser) == []  # no knob left behind between requests


def score(c: Client, prompts: str, calibrate: bool = True, seeds=4, model: str = MODEL):
    return c.predict(prompts, calibrate, seeds, model, api_name="/detect")


def test_detect_ranks_the_canary_first_and_flags_it(app):
    tb = app["engine"].model(MODEL).testbed
    canary, _, _, c = max(tb.canaries, key=lambda k: k[2])  # the most exposed canary
    ordinary = tb.prompt(c)
    table, summary = score(client(app), f"# its class's ordinary prompt, then the canary\n{ordinary}\n\n {canary}\n")
    assert table["headers"] == ["risk", "flagged", "magnitude", "consistency", "magnitude2", "contrast2", "sharpness",
                                "p", "verdict", "prompt"]  # fmt: skip
    (risk_c, flagged_c, *_, first), (risk_o, flagged_o, *_, second) = table["data"]
    assert table["data"][0][8] in ("memorized", "unusual")
    assert table["data"][1][8] == "ordinary"
    assert (first, flagged_c, second, flagged_o) == (canary, True, ordinary, False)
    assert risk_c > 3 > risk_o
    assert "1 of 2" in summary
    assert f"{len(tb.ordinary_prompts())} ordinary prompts" in summary


def test_detect_without_ordinary_prompts_notes_it(app, tmp_path):
    plain = tmp_path / "plain"  # not a testbed: no ordinary prompts to calibrate against
    shutil.copytree(app["engine"].model(MODEL).testbed.path, plain, ignore=shutil.ignore_patterns("testbed.json"))
    table, summary = score(client(app), "a two\na five\na seven", calibrate=True, seeds=3, model=str(plain))
    assert len(table["data"]) == 3
    assert "Calibration was ignored" in summary
    assert "scored prompts" in summary


BAD_DETECT = [
    (dict(prompts=""), "Expected at least one prompt"),
    (dict(prompts="# only a comment\n\n"), "Expected at least one prompt"),
    (dict(prompts="a two\n" * 201), "Expected at most 200 prompts per request, but got 201"),
    (dict(seeds=2), "Expected `seeds`"),
    (dict(seeds=2.5), "Expected `seeds`"),
]


@pytest.mark.parametrize("overrides, words", BAD_DETECT, ids=["empty", "comments", "too-many", "seeds-2", "seeds-2.5"])
def test_detect_bad_input_clear_message(app, overrides, words):
    c = client(app)
    with pytest.raises(AppError, match=words):
        score(c, **{"prompts": "a two", **overrides})
    assert generate(c, batch=1)[2] == "11"  # still serving


@pytest.fixture(scope="module")
def video_model(app) -> str:
    """A tiny TextToVideoSD pipeline folder (random weights) sharing the digits model's tokenizer and encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    digits = app["engine"].model(MODEL).pipe
    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        block_out_channels=(32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        in_channels=4,
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        out_channels=4,
        cross_attention_dim=digits.text_encoder.config.hidden_size,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        latent_channels=4,
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=8,
        sample_size=8,
    )
    pipe = TextToVideoSDPipeline(
        vae=vae, text_encoder=digits.text_encoder, tokenizer=digits.tokenizer, unet=unet, scheduler=DDIMScheduler()
    )
    path = app["tmp"] / "tiny-video"
    pipe.save_pretrained(path)
    return str(path)


def test_video_model_frames_and_fps(app, video_model):
    c = client(app)
    info, _, frames, fps, video, *_ = c.predict(video_model, False, api_name="/load_model")
    assert "(video)" in info
    assert frames["visible"]
    assert fps["visible"]
    assert video["visible"]
    gallery, _, _, clip = generate(c, model=video_model, frames=3, fps=4, batch=2)
    assert len(gallery) == 2
    assert Image.open(clip).n_frames == 3
    m = read_png_settings(gallery[0]["image"])["memctl"]
    assert (m["frames"], m["fps"], m["model"]) == (3, 4, video_model)
    unet = app["engine"].model(video_model).denoiser  # the knob on a video denoiser (UNet3DConditionModel)
    path = app["tmp"] / "video-map.safetensors"
    BlockMap.from_scores(unet, {b.name: (-1) ** i for i, b in enumerate(find_blocks(unet))}).save(path)
    label = c.predict(handle_file(str(path)), video_model, api_name="/load_map")[0]["value"]
    moved = generate(c, model=video_model, frames=3, fps=4, batch=2, map_label=label, fidelity=-1.0)[0]
    assert not np.array_equal(pixels(moved[0]["image"]), pixels(gallery[0]["image"]))
    info, _, frames, *_ = c.predict(MODEL, False, api_name="/load_model")
    assert not frames["visible"]


def test_docstring_examples_run():
    import doctest

    import memctl.ui.app
    import memctl.ui.canaries
    import memctl.ui.cli
    import memctl.ui.detect
    import memctl.ui.engine
    import memctl.ui.heatmap

    ui = memctl.ui
    for module in (ui.heatmap, ui.engine, ui.cli, ui.detect, ui.canaries, ui.app):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
        assert result.attempted > 0, module.__name__


def test_cli_binds_localhost_by_default():
    import argparse

    from memctl.ui.cli import HOST, add_cli, build_parser, run_cli

    args = build_parser().parse_args([])
    assert HOST == "127.0.0.1"
    assert (args.host, args.share, args.allow_hub) == ("127.0.0.1", False, False)
    parser = argparse.ArgumentParser(prog="memctl")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui", "--port", "7999", "--share"])
    assert (args.func, args.host, args.port, args.share, args.model) == (run_cli, HOST, 7999, True, "digits")


# ---------------------------------------------------------------------------------------------------------------
# hostile requests (issue 16): checked on the handlers and the engine directly, no server needed


class _FakePipe:
    """What `memctl.ui.engine._finish` needs of a pipeline: a denoiser and a call signature."""

    def __init__(self):
        self.unet = torch.nn.Linear(1, 1)

    def __call__(self, prompt, num_images_per_prompt=1):
        raise AssertionError("not sampled in these tests")


def test_a_request_cannot_switch_on_hub_downloads(monkeypatch):
    import gradio as gr

    import memctl.loading
    from memctl.ui.engine import Engine
    from memctl.ui.handlers import Handlers

    downloads = []
    monkeypatch.setattr(memctl.loading, "load_pipeline", lambda source, **kw: downloads.append(source) or _FakePipe())
    closed = Engine(MODEL, allow_hub=False)
    with pytest.raises(ValueError, match="restart the app with --allow-hub"):
        closed.model("someone/some-model", allow_hub=True)
    with pytest.raises(gr.Error, match="this server does not allow hub downloads"):
        Handlers(closed).load_model("someone/some-model", True)
    assert downloads == []
    opened = Engine(MODEL, allow_hub=True)
    with pytest.raises(ValueError, match="tick 'allow hub download'"):
        opened.model("someone/some-model", allow_hub=False)  # a request may narrow what the server allows
    assert downloads == []
    assert opened.model("someone/some-model", allow_hub=True).source == "someone/some-model"
    assert downloads == ["someone/some-model"]


def test_loading_a_model_does_not_hold_the_registry_lock(monkeypatch):
    import threading

    import memctl.ui.engine
    from memctl.ui.engine import Engine, Loaded

    started, release, calls = threading.Event(), threading.Event(), []

    def slow_load(source, allow_hub, server_allows=True):
        calls.append(source)
        started.set()
        assert release.wait(10)
        return Loaded(source, _FakePipe())

    monkeypatch.setattr(memctl.ui.engine, "_load", slow_load)
    engine = Engine(MODEL)
    results = []
    loaders = [threading.Thread(target=lambda: results.append(engine.model("slow/download"))) for _ in range(2)]
    loaders[0].start()
    assert started.wait(10)
    loaders[1].start()  # the same source: waits for the first load instead of downloading again
    other = threading.Thread(target=lambda: results.append((engine.map_labels(), engine.add_map("m", object()))))
    other.start()
    other.join(5)
    assert not other.is_alive(), "the registry lock was held during the download"
    release.set()
    for t in loaders:
        t.join(10)
    assert calls == ["slow/download"]
    assert results[1] is results[2]
    assert engine._loading == {}


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("steps", 1000, "Expected `steps` in [1, 100] (the app's range"),
        ("batch", 64, "Expected `batch_size` in [1, 16]"),
        ("guidance", 50, "Expected `guidance` in [0, 20]"),
        ("frames", 65, "Expected `frames` in [1, 64]"),
        ("fps", 61, "Expected `fps` in [1, 60]"),
        ("prompt", "a seven " * 125_000, "Expected `prompt` of at most 2000 characters, but got 'a seven a seven"),
    ],
)
def test_the_app_holds_requests_to_its_slider_ranges(tmp_path, field, value, words):
    import gradio as gr

    from memctl.ui.engine import Engine
    from memctl.ui.handlers import Handlers

    args = {**DEFAULTS, field: value}
    h = Handlers(Engine(MODEL), tmp_path)
    with pytest.raises(ValueError) as err:
        h.options(*list(args.values())[:12], video=True)
    assert words in str(err.value)
    assert len(str(err.value)) < 300
    if field not in ("frames", "fps"):  # (an image model ignores those)
        with pytest.raises(gr.Error, match=re.escape(words)):  # the button's handler answers with the message
            h.generate(*args.values())


def test_uploads_have_a_size_limit(tmp_path, monkeypatch):
    import gradio as gr

    import memctl.ui.app
    import memctl.ui.handlers
    from memctl.ui.engine import Engine
    from memctl.ui.handlers import Handlers

    h = Handlers(Engine(MODEL), tmp_path)
    monkeypatch.setattr(memctl.ui.handlers, "MAX_MAP_BYTES", 2**20)
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (2**20 + 1))
    with pytest.raises(gr.Error, match=r"Expected a block map file \(.safetensors\) of at most 1 MB, but"):
        h.upload_map(str(big), MODEL)
    preset = tmp_path / "big.json"
    preset.write_text(json.dumps({"prompt": "x" * 2**20}))
    with pytest.raises(gr.Error, match=r"Expected a preset file \(.json\) of at most 1 MB"):
        h.load_preset(str(preset))

    class FakeDemo:
        def queue(self):
            return self

        def launch(self, **kwargs):
            self.kwargs = kwargs

    demo = FakeDemo()
    memctl.ui.app.launch(demo, block=False)
    assert demo.kwargs["max_file_size"] == memctl.ui.handlers.MAX_UPLOAD
    assert "allowed_paths" not in demo.kwargs


def test_the_app_serves_only_what_it_wrote_and_removes_its_temporary_folder(tmp_path):
    import tempfile

    from memctl.ui.engine import Engine
    from memctl.ui.handlers import Handlers

    out = tmp_path / "out"
    h = Handlers(Engine(MODEL), out)
    gallery, *_ = h.generate(*{**DEFAULTS, "batch": 1, "steps": 1}.values())
    served = Path(gallery[0][0])
    assert served.parent == h.served_dir
    assert Path(tempfile.gettempdir()) in served.parents
    (kept,) = out.glob("*.png")  # the user's copy under --out
    assert kept.read_bytes() == served.read_bytes()
    assert kept.name == served.name
    h.close()
    assert not h.served_dir.exists()
    assert kept.is_file()


def test_cancel_entries_live_only_while_computing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from memctl.ui.engine import Cancelled, Engine
    from memctl.ui.handlers import Handlers

    h = Handlers(Engine(MODEL), tmp_path)
    seen = []

    def compute_map(model, cancel):
        seen.append(dict(h._cancel))
        raise Cancelled("Cancelled by the user.")

    monkeypatch.setattr(h.engine, "compute_map", compute_map)
    for i in range(100):
        status = h.compute_map(MODEL, SimpleNamespace(session_hash=f"s{i}"), progress=lambda *a, **k: None)[1]
        assert "cancelled" in status
    assert h._cancel == {}
    assert all(len(s) == 1 for s in seen)  # one entry while it ran, none after


def test_exposed_host_warns_and_auth_is_passed_on(monkeypatch, capsys):
    import memctl.ui.app
    import memctl.ui.engine
    from memctl.ui.cli import build_parser, exposure_warning

    assert exposure_warning("127.0.0.1", False, None) is None
    assert "every network interface (0.0.0.0)" in exposure_warning("0.0.0.0", False, None)
    assert "public share link" in exposure_warning("127.0.0.1", True, None)
    assert exposure_warning("0.0.0.0", True, ("ada", "pw")) is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--auth", "no-colon"])
    launched = {}
    monkeypatch.setattr(memctl.ui.app, "create_demo", lambda engine, out_dir=None: "demo")
    monkeypatch.setattr(memctl.ui.app, "launch", lambda demo, **kw: launched.update(kw))
    monkeypatch.setattr(memctl.ui.engine, "Engine", lambda *a, **k: None)
    args = build_parser().parse_args(["--host", "0.0.0.0", "--out", "somewhere"])
    assert args.func(args) == 0
    assert "memctl ui: warning: the app is reachable through every network interface" in capsys.readouterr().err
    assert launched["auth"] is None
    assert "allowed_paths" not in launched  # nothing under --out is served wholesale
    args = build_parser().parse_args(["--host", "0.0.0.0", "--auth", "ada:s3cret:x"])
    args.func(args)
    assert launched["auth"] == ("ada", "s3cret:x")
    assert capsys.readouterr().err == ""
