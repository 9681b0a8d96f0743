"""The web UI in a real browser: headless Chromium (Debian's /usr/bin/chromium, installed by `make test` via
tools/ensure_chromium.sh) driven by Playwright. Opens the page, picks two LoRAs and a method, clicks Generate,
waits for the image, checks it is a loraloom PNG of the requested size, saves a screenshot, and drops the PNG on
the Reproduce tab.

With the toy world installed the page serves it (two toy-world LoRAs); otherwise the tiny model and the example
LoRAs. The screenshot goes to outputs/ui_screenshot.png (or $LORALOOM_UI_SCREENSHOT).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")

from playwright.sync_api import expect  # noqa: E402

from loraloom.app.ui.sandbox import serve, tiny_ui_world  # noqa: E402

CHROMIUM = os.environ.get("LORALOOM_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(os.environ.get("LORALOOM_UI_SCREENSHOT", Path(__file__).resolve().parents[1] / "outputs" / "ui_screenshot.png"))
WAIT = 60_000  # ms; Playwright's default 5 s is too short on a busy 2-core machine
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]



pytestmark = [pytest.mark.usefixtures("one_thread_module"), pytest.mark.skipif(
    not (Path(CHROMIUM).exists() or shutil.which("chromium")),
    reason=f"no Chromium at {CHROMIUM}: `make test` installs it (tools/ensure_chromium.sh, apt-get install chromium); "
           "this machine could not",
)]


def browser_world(tmp_path):
    """The toy world's model and LoRAs when installed (a subject and a style LoRA), else the tiny test world."""
    from loraloom.app.ui.config import default_config, toyworld_available

    if toyworld_available():
        cfg = default_config()
        cfg.output_dir, cfg.clip, cfg.steps = tmp_path / "out", None, min(cfg.steps, 8)
        from loraloom.app.ui.service import GenerationService

        items = [i for i in GenerationService(cfg).library() if i.info is not None]
        subject = next((i for i in items if i.info.category in ("character", "object", "clothing")), items[0])
        style = next((i for i in items if i.info.category in ("style", "background") and i is not subject),
                     next(i for i in items if i is not subject))
        pair = [subject.name, style.name]
    else:
        cfg = tiny_ui_world(tmp_path, clip=False, hazards=False)
        pair = ["tiny_character", "tiny_style"]
    cfg.loras = []  # the test picks them
    return cfg, pair


def pick(page, slot_selector: str, option: str) -> None:
    page.locator(f"{slot_selector} input").click()
    page.locator(slot_selector).get_by_role("option", name=option, exact=True).click()


def test_browser_generates_an_image(tmp_path):
    from PIL import Image

    from loraloom.pipelines.spec import SPEC_CHUNK, GenerationSpec

    config, pair = browser_world(tmp_path)
    with serve(config) as (demo, url):
        side, _ = demo.service.geometry(config.models[0])
        height, width = config.height or side, config.width or side
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                        headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1300})
                page.set_default_timeout(60_000)
                page.goto(url)
                page.wait_for_selector("#generate-btn")
                pick(page, "#lora-1", pair[0])
                pick(page, "#lora-2", pair[0])  # a mistake first: the error shows in the page
                page.locator("#generate-btn").click()
                expect(page.get_by_test_id("toast-body").first).to_contain_text("chosen twice", timeout=WAIT)
                pick(page, "#lora-2", pair[1])
                pick(page, "#method", "switch")
                expect(page.locator("#params-switch")).to_be_visible(timeout=WAIT)
                page.locator("#insert-triggers").click()
                page.locator("#generate-btn").click()
                image = page.locator("#gallery img").first
                expect(image).to_be_visible(timeout=180_000)
                expect(page.locator("#status")).to_contain_text("done", timeout=WAIT)
                expect(page.locator("#preview img")).to_be_visible(timeout=WAIT)
                data = page.request.get(image.get_attribute("src")).body()
                for close in page.get_by_test_id("toast-close").all():  # the earlier error's toast, if still shown
                    try:
                        close.click(timeout=2000)
                    except playwright_api.Error:  # it closed by itself meanwhile
                        pass
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
                # Reproduce: dropping the PNG fills the form again (the upload is checked and deleted by the handler)
                made = tmp_path / "made.png"
                made.write_bytes(data)
                page.get_by_role("tab", name="Import").click()  # issue 22: Reproduce became Import (loraloom and A1111 PNGs)
                page.locator("#png-drop input[type=file]").set_input_files(str(made))
                expect(page.locator("#restore-status")).to_contain_text("restored the settings of", timeout=WAIT)
                expect(page.locator("#restore-status")).to_contain_text("made.png", timeout=WAIT)
            finally:
                browser.close()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size == (width, height)
        spec = GenerationSpec.from_dict(__import__("json").loads(im.text[SPEC_CHUNK]))
    assert spec.method == "switch" and [l.name for l in spec.loras] == pair
    assert all(t in spec.prompt for l in spec.loras for t in l.triggers)  # "Insert trigger words" worked
    assert SCREENSHOT.stat().st_size > 10_000  # a rendered page, not a blank one
