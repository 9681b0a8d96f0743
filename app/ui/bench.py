"""Time per image through the web UI vs through the Python API, on the same model in one process.

    python -m loraloom.app.ui.bench [--model …] [--lora-dir …] [--loras a,b] [--method merge] [--steps N] [--repeats 5]

Defaults: the UI's default world (the toy world when installed) and its first two LoRAs. Rounds alternate
UI and API so load on the machine hits both alike. Three timings per round:

- api:     `ComposedPipeline.__call__` (the generation alone, no file written);
- service: `GenerationService.generate` (spec, generation, PNG with the spec written) — what the UI runs;
- ui:      `gradio_client` `/generate` round trip (queue, per-step previews, PNG download) from request to result;
- ui_no_download: the same without the client downloading the files;
- browser: with `--browser`, headless Chromium clicks Generate (a new seed each time) and waits until the image
           is in the gallery — the time a person waits.

Prints medians and `ui_vs_api` (median ui / median api) last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    """The command line: model, LoRAs, method and size of the image, repeats, the UI's preview settings."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--lora-dir")
    p.add_argument("--loras", help="comma-separated library names (default: the first two)")
    p.add_argument("--method", default="merge")
    p.add_argument("--steps", type=int)
    p.add_argument("--size", type=int, help="image side (default: the model's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--preview-every", type=int, help="the UI's preview setting (default: the UI's, every step)")
    p.add_argument("--preview-interval", type=float, help="the UI's update interval (default: the UI's, 0.25 s)")
    p.add_argument("--browser", action="store_true", help="also time clicks in headless Chromium (/usr/bin/chromium)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1; on a busy 2-core machine 2 threads collapse in the main thread, "
                        "which would flatter the UI, whose generation runs in a worker thread)")
    return p


def _ui_config(args: argparse.Namespace):
    """The UI's default configuration with the flags' model, LoRA folder and preview settings; output to a temp folder."""
    from .config import default_config

    cfg = default_config()
    if args.model:
        cfg.models = [args.model]
    if args.lora_dir:
        cfg.lora_dirs = [Path(args.lora_dir)]
    cfg.output_dir = Path(tempfile.mkdtemp(prefix="loraloom-ui-bench-"))
    cfg.clip = None
    if args.preview_every is not None:
        cfg.preview_every = args.preview_every
    if args.preview_interval is not None:
        cfg.preview_interval = args.preview_interval
    return cfg


def _set_page(cfg, args: argparse.Namespace) -> tuple[list[str], int, int]:
    """Pick the LoRAs (the flag's, else the library's first two), steps and image side, and open the page with them,
    so a click in the browser asks for the same image as the API calls. Returns (LoRA names, steps, side)."""
    from .service import GenerationService

    probe = GenerationService(cfg)
    names = args.loras.split(",") if args.loras else [i.name for i in probe.library() if i.info][:2]
    side, _ = probe.geometry(cfg.models[0], load=False)
    size = args.size or cfg.height or side
    steps = args.steps or cfg.steps
    cfg.loras, cfg.method, cfg.steps, cfg.height, cfg.width = [(n, 1.0) for n in names], args.method, steps, size, size
    cfg.prompt = cfg.prompt or "a picture, {triggers}"
    return names, steps, size


def _timed_calls(service, url: str, cfg, names: list[str], method: str, steps: int, size: int) -> list[tuple[str, object]]:
    """The calls to time, after a warm-up generation: (name, no-argument function) for ui, api, service and
    ui_no_download, all asking for the same image."""
    from gradio_client import Client

    loras = [[n, 1.0] for n in names]
    client = Client(url, verbose=False, download_files=str(cfg.output_dir / "downloads"))
    spec = service.make_spec(cfg.models[0], cfg.prompt or "a picture, {triggers}", cfg.negative_prompt, loras,
                             method, {}, steps, cfg.guidance_scale, size, size, cfg.scheduler, 0)
    cp = service.pipeline(cfg.models[0])
    service.generate(spec)  # warm-up: LoRAs loaded, first-call costs paid

    def api():
        cp(spec.prompt, negative_prompt=spec.negative_prompt, loras=[(r.adapter_name, r.weight) for r in spec.loras],
           method=spec.method, method_params=spec.method_params, num_inference_steps=spec.steps,
           guidance_scale=spec.guidance_scale, height=size, width=size, seed=spec.seed, scheduler=spec.scheduler,
           progress_bar=False)

    bare = Client(url, verbose=False, download_files=False)

    def ui(c=client):
        c.predict(cfg.models[0], spec.prompt, spec.negative_prompt, loras, spec.method, {}, steps,
                  spec.guidance_scale, size, size, spec.scheduler, 0, api_name="/generate")

    return [("ui", ui), ("api", api), ("service", lambda: service.generate(spec)), ("ui_no_download", lambda: ui(bare))]


def _time_rounds(runs: list[tuple[str, object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, `repeats` rounds, the calls alternating within a round."""
    times = {name: [] for name, _ in runs}
    for _ in range(repeats):
        for name, fn in runs:
            t = time.perf_counter()
            own = fn()  # a call that settles after its measurement returns the seconds it measured
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t)
    return times


def _print_timings(cfg, args: argparse.Namespace, names: list[str], steps: int, size: int,
                   times: dict[str, list[float]]) -> None:
    """The settings, each call's median and runs, and each median over the API's; `ui_vs_api` last."""
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {cfg.models[0]}  loras {names}  method {args.method}  steps {steps}  size {size}x{size}  "
          f"repeats {args.repeats}  preview every {cfg.preview_every} step(s), at most every {cfg.preview_interval} s")
    for k in times:
        print(f"{k:15s} median {med[k]:.3f} s   runs {', '.join(f'{x:.3f}' for x in times[k])}")
    for k in times:
        if k not in ("api", "ui"):
            print(f"{k}_vs_api {med[k] / med['api']:.2f}")
    print(f"ui_vs_api {med['ui'] / med['api']:.2f}")


def main(argv: list[str] | None = None) -> int:
    """Serve the UI in this process, time the UI and the API on the same image in alternating rounds, print medians."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = _parser().parse_args(argv)

    import torch

    from .sandbox import serve

    torch.set_num_threads(args.threads)
    cfg = _ui_config(args)
    names, steps, size = _set_page(cfg, args)
    with serve(cfg) as (demo, url):
        runs = _timed_calls(demo.service, url, cfg, names, args.method, steps, size)
        with _browser(url, args.browser) as click:
            if click:
                runs.append(("browser", click))
            times = _time_rounds(runs, args.repeats)
    _print_timings(cfg, args, names, steps, size, times)
    return 0


@contextlib.contextmanager
def _browser(url: str, wanted: bool):
    """A `click()` that generates once in headless Chromium and returns when the image is in the gallery."""
    if not wanted:
        yield None
        return
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("LORALOOM_CHROMIUM", "/usr/bin/chromium"), args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(300_000)
        page.goto(url)
        page.wait_for_selector("#generate-btn")
        seeds = iter(range(1000, 100000))

        def click() -> float:
            """Seconds from the click until the image is in the gallery; then (not timed) the page's follow-up work
            settles, so it does not run into the next call's time."""
            seed = next(seeds)
            page.locator("#seed input").fill(str(seed))
            start = time.perf_counter()
            page.locator("#generate-btn").click()
            page.wait_for_selector(f'#gallery img[src*="_s{seed}_"]')
            took = time.perf_counter() - start
            page.wait_for_function("() => (document.querySelector('#status')?.innerText || '').includes('done')")
            time.sleep(1.0)
            return took

        try:
            click()  # warm-up (page scripts, first update)
            yield click
        finally:
            browser.close()


if __name__ == "__main__":
    raise SystemExit(main())
