"""The screenshots of docs/ui.md, made by hand (not by the tests):

    .venv/bin/python -m loraloom.app.ui.screenshots [--out docs/img] [--only workbench grid ...]

Serves the toy world in this process (its LoRAs copied to a temporary folder, so previews made here never touch
`assets/toyworld/loras`; a fresh output folder) and drives headless Chromium (/usr/bin/chromium) through what
each picture shows:

- ui_workbench.png: the Workbench at 1400x1000 after a Switch generation of two LoRAs;
- ui_grid.png (the page) and ui_grid_8x4.png (the grid image): the X/Y/Z plot of 8 methods x 4 seeds;
- ui_browser.png: the LoRA browser after "make preview" of every LoRA;
- ui_history.png: the History tab;
- ui_regions.png: two regions (left/right) with their prompts and LoRAs, and the mask preview over the image;
- ui_mobile.png: the page on a 400x900 phone screen.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

METHODS = ["merge", "switch", "composite", "klora", "ziplora", "clora", "cmlora", "loratorio"]
SHOTS = ["workbench", "grid", "browser", "history", "regions", "mobile"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _pick(page, selector: str, option: str) -> None:
    page.locator(f"{selector} input").first.click()
    page.locator(selector).get_by_role("option", name=option, exact=True).click()


def _type(page, selector: str, text) -> None:
    box = page.locator(f"{selector} textarea, {selector} input").first
    box.click()
    box.press("Control+a")
    box.press("Delete")
    box.press_sequentially(str(text))
    box.blur()


def _wait_text(page, selector: str, text: str, timeout: float = 1_800_000) -> None:
    page.wait_for_function("([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)", arg=[selector, text],
                           polling=200, timeout=timeout)


def _close_toasts(page) -> None:
    for close in page.get_by_test_id("toast-close").all():
        try:
            close.click(timeout=1000)
        except Exception:  # closed by itself meanwhile
            pass


def world(root: Path):
    """The toy world's UI config with its LoRAs copied under `root` and outputs in `root/out`."""
    from .config import default_config, toyworld_available

    if not toyworld_available():
        raise SystemExit("the toy world is not installed (assets/toyworld): no screenshots to make")
    cfg = default_config()
    loras = root / "loras"
    shutil.copytree(cfg.lora_dirs[0], loras)
    cfg.lora_dirs = [loras]
    cfg.output_dir = root / "out"
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/img", help="folder for the PNGs (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=SHOTS, default=SHOTS)
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch
    from playwright.sync_api import sync_playwright

    from .config import default_threads
    from .sandbox import serve

    torch.set_num_threads(default_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="loraloom-ui-shots-"))
    cfg = world(root)
    try:
        with serve(cfg) as (demo, url), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=os.environ.get("LORALOOM_CHROMIUM", "/usr/bin/chromium"),
                                         headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(600_000)
                page.goto(url)
                page.wait_for_selector("#generate-btn")
                _wait_text(page, "#token-count", "tokens")
                if "workbench" in args.only:
                    _pick(page, "#method", "switch")
                    page.locator("#generate-btn").click()
                    _wait_text(page, "#status", "done")
                    time.sleep(1)
                    page.screenshot(path=str(out / "ui_workbench.png"))
                if "grid" in args.only:
                    page.get_by_role("tab", name="X/Y/Z plot").click()
                    _type(page, "#axis-x-values", ", ".join(METHODS))
                    _pick(page, "#axis-y-kind", "seed")
                    _type(page, "#axis-y-values", "0, 1, 2, 3")
                    page.locator("#grid-btn").click()
                    _wait_text(page, "#grid-status", "X/Y/Z plot: 32 cells")
                    time.sleep(1)
                    page.locator("#results").screenshot(path=str(out / "ui_grid.png"))
                    grid = next((cfg.output_dir / "grids").glob("grid_*.png"))
                    shutil.copyfile(grid, out / "ui_grid_8x4.png")
                if "browser" in args.only:
                    from gradio_client import Client

                    client = Client(url, verbose=False, download_files=False)
                    for item in demo.service.library():  # every LoRA's preview, through /make_preview
                        client.predict(item.name, cfg.models[0], "", "all categories", api_name="/make_preview")
                    page.reload()
                    page.wait_for_selector("#generate-btn")
                    page.get_by_role("tab", name="LoRAs").click()
                    page.locator("#lora-cards .thumbnail-item").nth(3).click()  # character_2: into LoRA row 3
                    _wait_text(page, "#browser-status", "added")
                    time.sleep(1)
                    page.screenshot(path=str(out / "ui_browser.png"))
                if "history" in args.only:
                    page.get_by_role("tab", name="History").click()
                    page.locator("#history-refresh").click()
                    _wait_text(page, "#history-status", "item(s)")
                    time.sleep(1)
                    page.screenshot(path=str(out / "ui_history.png"))
                if "regions" in args.only:
                    page.reload()
                    page.wait_for_selector("#generate-btn")
                    _wait_text(page, "#token-count", "tokens")
                    _pick(page, "#lora-2", "object_1")
                    page.locator("#regions").get_by_text("Regions").first.click()
                    _pick(page, "#region-split", "left / right")
                    page.locator("#region-2").first.wait_for()
                    _pick(page, "#region-loras-1", "character_1")
                    page.keyboard.press("Escape")
                    _pick(page, "#region-loras-2", "object_1")
                    page.keyboard.press("Escape")
                    page.locator("#generate-btn").click()
                    _wait_text(page, "#status", "done")
                    page.locator("#mask-preview-btn").click()
                    page.locator("#mask-preview img").wait_for()
                    time.sleep(1)
                    _close_toasts(page)
                    page.locator("#regions").first.screenshot(path=str(out / "ui_regions.png"))
                if "mobile" in args.only:
                    phone = browser.new_page(viewport={"width": 400, "height": 900})
                    phone.goto(url)
                    phone.wait_for_selector("#generate-btn")
                    _wait_text(phone, "#token-count", "tokens")
                    time.sleep(1)
                    phone.screenshot(path=str(out / "ui_mobile.png"))
            finally:
                browser.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("screenshots in", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
