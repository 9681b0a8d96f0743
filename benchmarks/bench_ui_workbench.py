"""The web UI's closing numbers (issue 22) on the toy world, one run, medians:

- threads:  per-image time of `GenerationService.generate` (what the UI runs) at torch's default thread count and
            at the UI's default (`loraloom.app.ui.config.default_threads`), alternating in one process; prints
            `ui_image_s_threads_N` for both and `ui_threads_default_vs_torch` (new / old).
- grid:     the X/Y/Z plot of 8 methods x 4 seeds in headless Chromium (a fresh output folder, so no cell is
            reused): seconds from the click to the first cell drawn on the page and to the whole grid; prints
            `grid_first_cell_s`, `grid_8x4_s` and `grid_8x4_cells_s` (the cells' own generation time, summed, from
            the grid's record).
- overhead: `python -m loraloom.app.ui.bench` (the same image through the Python API, through `/generate` and,
            with Chromium, a click until the image is in the gallery); prints its medians and `ui_vs_api`
            (target <= 1.15).

    .venv/bin/python benchmarks/bench_ui_workbench.py [--part threads grid overhead] [--repeats 5]

Wall-clock numbers: on a shared machine they move with the load (printed first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ["merge", "switch", "composite", "klora", "ziplora", "clora", "cmlora", "loratorio"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def toy_config():
    from loraloom.app.ui.config import default_config, toyworld_available

    if not toyworld_available():
        raise SystemExit("the toy world is not installed (assets/toyworld): nothing to measure")
    cfg = default_config()
    cfg.output_dir = Path(tempfile.mkdtemp(prefix="loraloom-ui-workbench-"))
    return cfg


def part_threads(repeats: int, torch_default: int) -> None:
    import torch

    from loraloom.app.ui.config import default_threads
    from loraloom.app.ui.service import GenerationService

    cfg = toy_config()
    service = GenerationService(cfg)
    spec = service.make_spec(cfg.models[0], cfg.prompt, cfg.negative_prompt, [[n, w] for n, w in cfg.loras], "merge",
                             {}, cfg.steps, cfg.guidance_scale, cfg.height, cfg.width, cfg.scheduler, 0)
    new = default_threads()
    counts = list(dict.fromkeys([torch_default, new]))
    times: dict[int, list[float]] = {n: [] for n in counts}
    service.generate(spec)  # warm-up
    for _ in range(repeats):
        for n in counts:
            torch.set_num_threads(n)
            t = time.perf_counter()
            service.generate(spec)
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"threads: torch default {torch_default}, UI default {new}; {cfg.steps} steps {cfg.width}x{cfg.height} merge "
          f"of {len(cfg.loras)} LoRAs, {repeats} rounds")
    for n in counts:
        print(f"ui_image_s_threads_{n} {med[n]:.3f}   runs {', '.join(f'{x:.3f}' for x in times[n])}")
    print(f"ui_threads_default_vs_torch {med[new] / med[torch_default]:.2f}")


def part_grid() -> None:
    import torch
    from playwright.sync_api import sync_playwright

    from loraloom.app.ui.config import default_threads
    from loraloom.app.ui.sandbox import serve

    torch.set_num_threads(default_threads())
    cfg = toy_config()
    cfg.clip = None  # the time of the cells, not of scoring them
    with serve(cfg) as (demo, url), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("LORALOOM_CHROMIUM", "/usr/bin/chromium"),
                                    headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(1_800_000)
            page.goto(url)
            page.wait_for_selector("#generate-btn")
            page.get_by_role("tab", name="X/Y/Z plot").click()
            page.locator("#axis-x-values textarea").fill(", ".join(METHODS))
            page.locator("#axis-y-kind input").click()
            page.locator("#axis-y-kind").get_by_role("option", name="seed", exact=True).click()
            page.locator("#axis-y-values textarea").fill("0, 1, 2, 3")
            page.locator("#axis-y-values textarea").press("Tab")
            time.sleep(1)
            start = time.perf_counter()
            page.locator("#grid-btn").click()
            page.wait_for_selector("#grid-image img")
            first = time.perf_counter() - start
            page.wait_for_function("() => (document.querySelector('#grid-status')?.innerText || '')"
                                   ".includes('X/Y/Z plot: 32 cells')", polling=100)
            whole = time.perf_counter() - start
        finally:
            browser.close()
    from loraloom.pipelines.grid import read_grid_record

    record = read_grid_record(next((cfg.output_dir / "grids").glob("grid_*.png")))
    cells = sum(c.get("seconds") or 0.0 for c in record["cells"])
    print(f"grid: {len(METHODS)} methods x 4 seeds, {cfg.steps} steps {cfg.width}x{cfg.height}, toy world")
    print(f"grid_first_cell_s {first:.2f}")
    print(f"grid_8x4_s {whole:.1f}")
    print(f"grid_8x4_cells_s {cells:.1f}")


def main(argv: list[str] | None = None) -> int:
    import torch

    torch_default = torch.get_num_threads()  # before anything sets it
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", nargs="+", choices=["threads", "grid", "overhead"], default=["threads", "grid", "overhead"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if "threads" in args.part:
        part_threads(args.repeats, torch_default)
    if "grid" in args.part:
        part_grid()
    if "overhead" in args.part:
        from loraloom.app.ui import bench
        from loraloom.app.ui.config import default_threads

        browser = ["--browser"] if Path(os.environ.get("LORALOOM_CHROMIUM", "/usr/bin/chromium")).exists() else []
        bench.main(["--repeats", str(args.repeats), "--threads", str(default_threads()), *browser])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
