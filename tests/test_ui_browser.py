"""The Gradio app in a real headless browser (Debian's chromium driven by Playwright): the first screen (a canary's
sweep beside its training image), then move the fidelity slider, click Generate, wait for the image, check the
gallery and the settings embedded in the PNG it serves.

Saves screenshots under `out/` (`app-first-screen.png`, `ui-screenshot*.png`); with `MEMCTL_UPDATE_DOCS=1` the
first screen also goes to `docs/app-first-screen.png`. Skipped only when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"{CHROMIUM} is absent (install Debian's chromium: apt-get install -y chromium)", allow_module_level=True
    )
ROOT = Path(__file__).resolve().parents[1]

from PIL import Image  # noqa: E402
from playwright import sync_api  # noqa: E402
from uiapp import running_app  # noqa: E402

from memctl.blockmap import BlockMap  # noqa: E402
from memctl.blocks import find_blocks  # noqa: E402
from memctl.grid import tensor_to_pil  # noqa: E402
from memctl.metadata import read_png_settings  # noqa: E402

MODEL = os.environ.get("MEMCTL_UI_TEST_MODEL", "digits")
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # gradio's own pandas deprecations
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = ROOT / "out" / "ui-screenshot.png"
FIRST_SCREEN = ROOT / "out" / "app-first-screen.png"
DOCS_FIRST_SCREEN = ROOT / "docs" / "app-first-screen.png"
VIEWPORT = {"width": 1500, "height": 1000}  # a laptop screen: what "the first screen" means here
TIMEOUT_MS = 120_000
STEPS = 10  # few, but enough for the screenshot to show digits


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ui-browser")
    with running_app(MODEL, tmp / "out") as (url, engine):
        yield {"url": url, "engine": engine, "tmp": tmp}


@pytest.fixture(scope="module")
def page(app):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app["url"])
        page.wait_for_selector("#model-info :text('embedded testbed')")
        yield page
        browser.close()


def _wait_for_images(page, selector: str) -> None:
    images = f"[...document.querySelectorAll({selector!r})]"
    page.wait_for_function(f"{images}.every(im => im.complete && im.naturalWidth > 0)")


def test_first_screen_shows_a_canary_sweep(page, app):
    """Before any click: a most exposed canary's sweep beside its bound training image, a new image at fidelity −1
    and a copy of that very training image at +1 for every seed, read from the app's own badges."""
    tb = app["engine"].model(MODEL).testbed
    page.wait_for_function("document.querySelectorAll('#sweep-gallery img').length === 10")  # 2 seeds x 5 fidelities
    _wait_for_images(page, "#sweep-sheet img, #sweep-gallery img, #bound img")

    prompt = page.locator("#prompt textarea").input_value()
    canaries = {p: (image, exposure, c) for p, image, exposure, c in tb.canaries}
    assert prompt in canaries, prompt
    bound, exposure, c = canaries[prompt]
    assert exposure == max(tb.exposures)
    assert page.get_by_role("tab", name="Sweep").get_attribute("aria-selected") == "true"
    assert page.locator("#examples tbody tr").first.inner_text().startswith(prompt)  # canaries are listed first
    assert "reproduce a training image" in page.locator("#header").inner_text()

    assert page.locator("#bound img").is_visible()
    assert prompt in page.locator("#bound-kind").inner_text()
    served = Image.open(io.BytesIO(page.request.get(page.locator("#bound img").get_attribute("src")).body()))
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(tensor_to_pil(bound, 96)))

    lines = page.locator("#sweep-badges").inner_text().splitlines()
    seeds = sorted({int(line.split(" · ")[1].removeprefix("seed ")) for line in lines})
    assert len(lines) == 10
    assert len(seeds) == 2
    copied = [k for k in range(len(tb.train_images)) if torch.equal(tb.train_images[k], bound)]
    for seed in seeds:
        (left,) = [line for line in lines if line.startswith(f"fidelity -1.0 · seed {seed} · ")]
        (right,) = [line for line in lines if line.startswith(f"fidelity +1.0 · seed {seed} · ")]
        assert left.endswith(f"novel: a new {tb.classes[c]}"), left
        assert right.split(" · ")[-1] in {f"COPY of training image #{k}" for k in copied}, right
    captions = page.locator("#sweep-gallery .caption-label").all_inner_texts()
    assert captions[:5] == ["\u22121.0", "\u22120.5", "0", "+0.5", "+1.0"]  # short, whole captions
    assert not page.get_by_role("button", name="Cancel").is_visible()  # only while a map is computed

    FIRST_SCREEN.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(FIRST_SCREEN))
    if os.environ.get("MEMCTL_UPDATE_DOCS") == "1":  # the picture in memctl/ui/README.md: a small palette PNG
        Image.open(FIRST_SCREEN).convert("RGB").quantize(64).save(DOCS_FIRST_SCREEN, optimize=True)


def _ensure_block_map(page, app) -> None:
    """The shipped map is preselected when the model ships one; otherwise load a hand-made map file."""
    if page.locator("#block-map input").input_value() != "none":
        return
    unet = app["engine"].model(MODEL).denoiser
    names = [b.name for b in find_blocks(unet)]
    path = app["tmp"] / "browser-map.safetensors"
    BlockMap.from_scores(unet, {n: (0.9 if n.startswith("up_blocks.0") else -0.3) for n in names}).save(path)
    page.locator("#map-file input[type=file]").set_input_files(str(path))
    page.wait_for_function("document.querySelector('#block-map input').value.startsWith('file:')")


def _direct(app, map_label: str, fidelity: float, seed: int) -> np.ndarray:
    """The same image made outside the app with the documented knob calls."""
    from memctl import knob

    engine = app["engine"]
    loaded = engine.model(MODEL)
    bmap = engine.block_map(map_label, loaded)
    with engine.lock:
        knob.apply_knob(loaded.pipe, bmap)
        try:
            with knob.fidelity(loaded.pipe, fidelity):
                image = loaded.pipe(
                    "a seven", num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(seed)]
                ).images[0]
        finally:
            knob.remove_knob(loaded.pipe)
    return np.asarray(image)


def test_slider_generate_gallery_png_settings(page, app):
    _ensure_block_map(page, app)
    map_label = page.locator("#block-map input").input_value()

    page.locator("#prompt textarea").fill("a seven")
    page.locator("#batch input[type=number]").fill("1")
    page.locator("#batch input[type=number]").press("Enter")
    page.get_by_role("tab", name="Images").click()
    slider = page.locator("#fidelity input[type=range]")
    slider.focus()
    for _ in range(10):  # ten steps of 0.05 to the left: fidelity −0.5
        page.keyboard.press("ArrowLeft")
    page.wait_for_function("document.querySelector('#fidelity input[type=number]').value === '-0.5'")

    page.locator("#seed input").fill("5")
    page.locator("#steps input[type=number]").fill(str(STEPS))
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate").click()

    image = page.locator("#gallery img").first
    image.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#seed-used textarea, #seed-used input').value === '5'")
    assert page.locator("#gallery img").count() == 1
    caption = page.locator("#badges").inner_text()
    assert "seed 5" in caption

    body = page.request.get(image.get_attribute("src")).body()
    assert body[:8] == b"\x89PNG\r\n\x1a\n"  # PNG, not webp
    settings = read_png_settings(io.BytesIO(body))
    m = settings["memctl"]
    got = (m["prompt"], m["fidelity"], m["seed"], m["steps"], m["block_map"])
    assert got == ("a seven", -0.5, 5, STEPS, map_label)
    assert "Fidelity: -0.5" in settings["parameters"]
    assert "Seed: 5" in settings["parameters"]

    served = np.asarray(Image.open(io.BytesIO(body)))
    assert np.array_equal(served, _direct(app, map_label, fidelity=-0.5, seed=5))  # served as made, not re-encoded

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_heatmap_row_selection_names_the_block(page, app):
    _ensure_block_map(page, app)
    page.get_by_role("tab", name="Block map").click()
    page.locator("#heatmap img").wait_for(state="visible")
    first = find_blocks(app["engine"].model(MODEL).denoiser)[0].name
    page.locator("#block-table").get_by_text(first, exact=True).first.click()
    page.wait_for_function(f"document.querySelector('#block-info').innerText.includes('{first}')")
    page.screenshot(path=str(SCREENSHOT.with_name("ui-screenshot-blockmap.png")), full_page=True)
    page.get_by_role("tab", name="Images").click()


def test_canary_example_shows_its_bound_image(page, app):
    tb = app["engine"].model(MODEL).testbed
    prompt = max(reversed(tb.canaries), key=lambda c: c[2])[0]  # a most exposed canary, not the opening one
    examples = page.locator("#examples")
    for n in range(1, 8):
        if examples.get_by_text(prompt, exact=True).count():
            break
        examples.locator(".paginate button", has_text=str(n + 1)).click()
    examples.get_by_text(prompt, exact=True).click()
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === {prompt!r}")
    page.wait_for_function(f"document.querySelector('#bound-kind')?.innerText.includes({prompt!r})")
    page.locator("#bound img").wait_for(state="visible")
    assert "Canary" in page.locator("#bound-kind").inner_text()
    page.locator("#prompt textarea").fill("a seven")
    page.locator("#bound").wait_for(state="hidden")  # an ordinary prompt has no bound image


def test_sweep_and_ab_views(page, app):
    _ensure_block_map(page, app)
    page.locator("#seed input").fill("7")
    page.locator("#batch input[type=number]").fill("2")
    page.locator("#batch input[type=number]").press("Enter")
    page.locator("#sweep").click()
    page.get_by_role("tab", name="Sweep").click()
    page.wait_for_function("document.querySelector('#sweep-badges').innerText.includes('seed 8')")
    page.wait_for_function("document.querySelectorAll('#sweep-gallery img').length === 10")
    page.locator("#sweep-sheet img").wait_for(state="visible")
    _wait_for_images(page, "#sweep-sheet img, #sweep-gallery img")
    text = page.locator("#sweep-badges").inner_text()
    assert all(f"fidelity {f} · seed {s}" in text for f in ("-1.0", "-0.5", "+0.0", "+0.5", "+1.0") for s in (7, 8))
    page.screenshot(path=str(SCREENSHOT.with_name("ui-screenshot-sweep.png")), full_page=True)

    page.locator("#ab").click()
    page.get_by_role("tab", name="A/B").click()
    page.wait_for_function("document.querySelectorAll('#ab-slider img').length >= 2")
    assert "A: fidelity 0" in page.locator("#ab-badges").inner_text()
    page.screenshot(path=str(SCREENSHOT.with_name("ui-screenshot-ab.png")), full_page=True)


def test_cancel_shows_only_while_a_map_is_computed(page, app):
    cancel = page.get_by_role("button", name="Cancel")
    assert not cancel.is_visible()
    page.get_by_role("button", name="Compute a map here").click()
    cancel.wait_for(state="visible")
    cancel.click()
    page.wait_for_function("(document.querySelector('#map-status')?.innerText ?? '').includes('was cancelled')")
    cancel.wait_for(state="hidden")


def test_detect_tab_scores_prompts_with_the_default_signals(page, app):
    tb = app["engine"].model(MODEL).testbed
    canary, _, _, c = max(tb.canaries, key=lambda k: k[2])  # the most exposed canary
    page.get_by_role("tab", name="Detect").click()
    page.locator("#detect-prompts textarea").fill(f"{tb.prompt(c)}\n{canary}\n")
    page.locator("#score").click()
    page.wait_for_function("document.querySelector('#detect-summary').innerText.includes('Verdict')")
    table = page.locator("#detect-table")
    for header in ("magnitude2", "contrast2", "sharpness", "verdict"):
        assert table.get_by_text(header, exact=True).count() >= 1
    assert table.get_by_text(canary, exact=True).count() >= 1
    page.screenshot(path=str(SCREENSHOT.with_name("ui-screenshot-detect.png")), full_page=True)
    page.get_by_role("tab", name="Images").click()
