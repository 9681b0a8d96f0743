"""Time per image through the web UI vs through the Python API, on the same model in one process.

    python -m app.ui.bench [--model …] [--lora-dir …] [--loras a,b] [--method merge] [--steps N] [--repeats 5]

Defaults: the UI's default world (the toy world when installed) and its first two LoRAs. Rounds alternate
UI and API so load on the machine hits both alike. Three timings per round:

- api:     `ComposedPipeline.__call__` (the generation alone, no file written);
- service: `GenerationService.generate` (spec, generation, PNG with the spec written) — what the UI runs;
- ui:      `gradio_client` `/generate` round trip (queue, per-step previews, PNG download) from request to result;
- ui_no_download: the same without the client downloading the files (what a browser waits for before it
           fetches the image).

Prints medians and `ui_vs_api` (median ui / median api) last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
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
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1; on a busy 2-core machine 2 threads collapse in the main thread, "
                        "which would flatter the UI, whose generation runs in a worker thread)")
    args = p.parse_args(argv)

    import torch
    from gradio_client import Client

    from .config import default_config
    from .testing import serve

    torch.set_num_threads(args.threads)
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
    with serve(cfg) as (demo, url):
        service = demo.service
        names = args.loras.split(",") if args.loras else [i.name for i in service.library() if i.info][:2]
        side, _ = service.geometry(cfg.models[0])
        size = args.size or cfg.height or side
        steps = args.steps or cfg.steps
        loras = [[n, 1.0] for n in names]
        client = Client(url, verbose=False, download_files=str(cfg.output_dir / "downloads"))
        spec = service.make_spec(cfg.models[0], cfg.prompt or "a picture, {triggers}", cfg.negative_prompt, loras,
                                 args.method, {}, steps, cfg.guidance_scale, size, size, cfg.scheduler, 0)
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

        times = {"api": [], "service": [], "ui": [], "ui_no_download": []}
        for _ in range(args.repeats):
            for name, fn in (("ui", ui), ("api", api), ("service", lambda: service.generate(spec)),
                             ("ui_no_download", lambda: ui(bare))):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {cfg.models[0]}  loras {names}  method {args.method}  steps {steps}  size {size}x{size}  "
          f"repeats {args.repeats}  preview every {cfg.preview_every} step(s), at most every {cfg.preview_interval} s")
    for k in ("api", "service", "ui_no_download", "ui"):
        print(f"{k:15s} median {med[k]:.3f} s   runs {', '.join(f'{x:.3f}' for x in times[k])}")
    print(f"service_vs_api {med['service'] / med['api']:.2f}")
    print(f"ui_no_download_vs_api {med['ui_no_download'] / med['api']:.2f}")
    print(f"ui_vs_api {med['ui'] / med['api']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
