"""``ifadapter studio`` in a real browser: the system's headless Chromium driven by Playwright,
against the console script serving the shipped toy models.

The page is used as a person uses it: boxes drawn with the mouse and described in the canvas's
own label box, files uploaded through the file input, results read from the page and the files
it offers. Screenshots go to ``$STUDIO_SCREENSHOTS`` when set (docs/studio.png is one).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ifadapter.cli import main
from tests.support.flows import flow_env
from tests.support.paths import FIXTURES, REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SETTINGS = ["--steps", "4", "--guidance", "5", "--unconditional-layout", "none"]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    """The console script's server on a free port, up once the page answers."""
    if CHROMIUM is None:
        message = "no chromium on PATH (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    log = tmp_path_factory.mktemp("studio") / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "ifadapter.cli", "studio", "--port", str(port)],
            cwd=tmp_path_factory.mktemp("cwd"),  # the defaults must not depend on the cwd
            env={**flow_env(), "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the studio did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, studio_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(studio_url)
    page.wait_for_selector("#canvas canvas")
    page.wait_for_timeout(500)
    yield page
    page.close()


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def draw(page, box: tuple[float, float, float, float], label: str) -> None:
    """Drags a box (fractions of the canvas's picture) and types its description."""
    area = page.locator("#canvas canvas").first.bounding_box()
    side = area["height"]  # the square picture is fitted to the canvas's height, centred
    left = area["x"] + (area["width"] - side) / 2
    page.get_by_label("Create box").click()
    page.mouse.move(left + box[0] * side, area["y"] + box[1] * side)
    page.mouse.down()
    page.mouse.move(left + box[2] * side, area["y"] + box[3] * side, steps=8)
    page.mouse.up()
    page.locator("#canvas input[role=listbox]").fill(label)
    page.keyboard.press("Enter")
    page.wait_for_timeout(200)


def set_number(page, elem_id: str, value: float) -> None:
    page.locator(f"#{elem_id} input").fill(str(value))


def generate(page) -> str:
    page.locator("#generate").click()
    page.wait_for_function(
        "document.querySelector('#notes').innerText.includes('generated in')", timeout=120_000
    )
    return page.locator("#notes").inner_text()


def download(page, box: str, name: str) -> bytes:
    link = page.locator(f"#{box} a[href*='{name}']").first
    return urllib.request.urlopen(link.get_attribute("href"), timeout=10).read()


def upload(page, path: Path) -> None:
    page.locator("input[data-testid$='-upload-button']").set_input_files(str(path))


def test_draw_generate_judge_and_save(page, tmp_path):
    draw(page, (0.05, 0.05, 0.5, 0.5), "a red solid circle")
    draw(page, (0.5, 0.45, 0.95, 0.9), "a blue striped square")
    draw(page, (0.05, 0.7, 0.25, 0.95), "")  # no description: left out, with a note
    page.locator("#caption textarea").fill("a red solid circle and a blue striped square")
    set_number(page, "steps", 4)
    set_number(page, "count", 2)
    set_number(page, "width", 60)  # not a size the toy UNet takes: refused, the layout stays
    page.locator("#generate").click()
    page.wait_for_function(
        "document.querySelector('#notes').innerText.includes('width 60 must be a positive')"
    )
    set_number(page, "width", 64)
    notes = generate(page)
    page.wait_for_function(  # the galleries' pictures loaded, for the screenshot
        "Array.from(document.querySelectorAll('#adapter-images img, #base-images img'))"
        ".every(image => image.complete && image.naturalWidth > 0)"
    )
    screenshot(page, "studio.png", tmp_path)
    assert "box 3: no description; left out" in notes
    assert page.locator("#adapter-images img").count() >= 4  # 2 images, each with its layout
    assert page.locator("#base-images img").count() >= 4
    table = page.locator("#verdicts").inner_text()
    for text in ("a red solid circle", "a blue striped square", "IFAdapter", "base", "seed 1"):
        assert text in table
    assert "not found" in table or "right" in table
    assert table.count("a red solid circle") == 4  # 2 seeds x (adapter, base)

    page.locator("#save").click()
    page.wait_for_selector("#saved a[href*='layout.json']")
    saved = json.loads(download(page, "saved", "layout.json"))
    assert saved["caption"] == "a red solid circle and a blue striped square"
    assert [i["caption"] for i in saved["instances"]] == [
        "a red solid circle",
        "a blue striped square",
    ]
    for instance, drawn in zip(
        saved["instances"], [(0.05, 0.05, 0.5, 0.5), (0.5, 0.45, 0.95, 0.9)], strict=True
    ):
        assert np.allclose(instance["box"], drawn, atol=0.01)

    # the round trip: the saved file loaded back saves as the same file
    (tmp_path / "layout.json").write_text(json.dumps(saved))
    upload(page, tmp_path / "layout.json")
    page.wait_for_function("document.querySelector('#notes').innerText.includes('loaded 1')")
    page.locator("#save").click()
    page.wait_for_timeout(1000)
    assert json.loads(download(page, "saved", "layout.json")) == saved


def test_a_loaded_layout_gives_the_image_generate_gives(page, tmp_path, one_torch_thread):
    # one torch thread, as the studio's server runs: another thread count sums in another order
    layouts = (REPO / "models" / "toy-adapter" / "layouts.jsonl").read_text().splitlines()
    (tmp_path / "two.jsonl").write_text("\n".join(layouts[:2]) + "\n")
    (tmp_path / "first.json").write_text(layouts[0])
    upload(page, tmp_path / "two.jsonl")
    page.wait_for_function("document.querySelector('#notes').innerText.includes('loaded 2')")
    assert page.locator("#caption textarea").input_value() == json.loads(layouts[0])["caption"]
    set_number(page, "seed", 3)
    set_number(page, "steps", 4)
    generate(page)
    shown = np.asarray(Image.open(BytesIO(download(page, "files", "/00000_0.png"))))
    argv = ["generate", "--base", str(REPO / "models" / "toy-base")]
    argv += ["--adapter", str(REPO / "models" / "toy-adapter"), "--device", "cpu"]
    argv += ["--layouts", str(tmp_path / "first.json"), "--out", str(tmp_path / "out")]
    assert main([*argv, *SETTINGS, "--seed", "3"]) == 0
    assert np.array_equal(shown, np.asarray(Image.open(tmp_path / "out" / "00000_0.png")))


def test_bad_files_get_a_message_and_the_layout_stays(page, tmp_path):
    draw(page, (0.1, 0.1, 0.6, 0.6), "a green dotted diamond")
    page.locator("#caption textarea").fill("kept")
    (tmp_path / "broken.json").write_text('{"caption": "x", "instances": [')
    upload(page, tmp_path / "broken.json")
    page.wait_for_function(
        "document.querySelector('#notes').innerText.includes('neither JSON nor JSON lines')"
    )
    screenshot(page, "studio-broken-file.png", tmp_path)
    assert (
        "Not done: broken.json is neither JSON nor JSON lines"
        in page.locator("#notes").inner_text()
    )
    assert page.locator("#caption textarea").input_value() == "kept"
    page.locator("#save").click()
    page.wait_for_selector("#saved a[href*='layout.json']")
    kept = json.loads(download(page, "saved", "layout.json"))
    assert [i["caption"] for i in kept["instances"]] == ["a green dotted diamond"]

    upload(page, FIXTURES / "released_layout.json")  # the authors' dataset/*.json format
    page.wait_for_function("document.querySelector('#notes').innerText.includes('loaded 1')")
    notes = page.locator("#notes").inner_text()
    assert "instance 3: reached past the 768-px canvas; clipped" in notes
    assert "instance 4: outside the 768-px canvas or empty; left out" in notes
    assert page.locator("#caption textarea").input_value() == "two toy shapes on a table"
