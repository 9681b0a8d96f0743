"""`loraloom ui`: the web workbench (Gradio) on 127.0.0.1, with the toy world (or the tiny model) loaded."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from .cli_options import add_offload_arguments


def register(sub) -> None:
    p = sub.add_parser("ui", help="start the web UI (Gradio) on 127.0.0.1",
                       description="Start the web workbench: LoRA library, compose, generate with previews, compare "
                                   "methods, reproduce from a PNG. Defaults: the toy world in assets/toyworld when it "
                                   "is there, else the tiny random model and assets/examples/loras. See docs/ui.md.")
    p.add_argument("--spec", help="take the model, LoRA folders and form defaults from a `loraloom generate` spec file")
    p.add_argument("--model", action="append", help="base model offered (diffusers folder, .safetensors file, tiny:sd1); "
                   "repeat for several, the first is loaded at start")
    p.add_argument("--model-dir", action="append", default=[], help="a folder of model folders/files that may be picked")
    p.add_argument("--lora-dir", action="append", help="a folder of LoRA files (repeatable); the only place LoRAs are read from")
    p.add_argument("--output-dir", default="outputs/ui", help="where generated PNGs are written (default: %(default)s)")
    p.add_argument("--clip", help="transformers CLIP folder for CLIPScore in Compare (default: the toy world's, if any)")
    p.add_argument("--no-clip", action="store_true", help="no CLIPScore in Compare")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s; 0: any free port)")
    p.add_argument("--auth", metavar="USER:PASS", default=os.environ.get("LORALOOM_UI_AUTH"),
                   help="require this login (or set LORALOOM_UI_AUTH=user:pass, which keeps it out of `ps`)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--dtype", help="float32 (default), float16 or bfloat16")
    add_offload_arguments(p)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice less one core, at least 1: "
                   "1 on a 2-core machine, where it measured faster; see docs/ui.md)")
    p.add_argument("--judge", choices=["openai", "transformers"],
                   help="an MLLM judge for the Score tab: an OpenAI-compatible server or a local transformers VLM")
    p.add_argument("--judge-model", help="the judge's model name (with --judge)")
    p.add_argument("--judge-base-url", help="the OpenAI-compatible server's URL (default: https://api.openai.com/v1)")
    p.add_argument("--judge-api-key-env", help="environment variable holding the judge's API key (default: OPENAI_API_KEY)")
    p.add_argument("--max-queue", type=int, help="requests that may wait for the model (default: 64)")
    p.add_argument("--max-sessions", type=int,
                   help="client sessions whose page state the server keeps in memory, least recently used dropped "
                        "first (default: 100)")
    p.add_argument("--cache-minutes", type=float,
                   help="how long Gradio's temporary copies (previews, gallery images, uploads) are kept "
                        "(default: 1440; 0: until the server stops)")
    p.add_argument("--max-upload-mb", type=float, help="size limit of a dropped PNG (default: 20)")
    p.add_argument("--max-lora-mb", type=float, help="size limit of an uploaded LoRA (default: 1024)")
    p.add_argument("--no-lora-upload", action="store_true", help="do not accept LoRA uploads in the Library tab")
    p.add_argument("--preview-every", type=int, help="decode a preview every N steps (0: none; default: 1)")
    p.add_argument("--preview-interval", type=float,
                   help="at most one progress update and preview per this many seconds (default: 0.25; 0: every step)")
    p.set_defaults(func=run)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("loraloom ui: --auth must be USER:PASS")
    return user, password


def config_from_args(args: argparse.Namespace):
    from loraloom.app.ui.config import default_config, from_spec

    cfg = from_spec(args.spec) if args.spec else default_config()
    if args.model:
        cfg.models = list(args.model)
        if not args.spec:
            cfg.loras = []
    if args.model_dir:
        cfg.model_dirs = [Path(d) for d in args.model_dir]
    if args.lora_dir:
        cfg.lora_dirs = [Path(d) for d in args.lora_dir]
    cfg.output_dir = Path(args.output_dir)
    if args.clip:
        cfg.clip = args.clip
    if args.no_clip:
        cfg.clip = None
    cfg.device = args.device
    if args.offload:
        from loraloom.pipelines.composed import check_offload

        check_offload(args.offload, args.device)  # no accelerator: one line before the server starts
        cfg.offload = args.offload
    for name in ("dtype", "max_queue", "max_sessions", "cache_minutes", "preview_every", "preview_interval", "max_lora_mb"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.max_upload_mb is not None:
        cfg.max_png_mb = args.max_upload_mb
    cfg.allow_lora_upload = not args.no_lora_upload
    if args.judge:
        if not args.judge_model:
            raise SystemExit("loraloom ui: --judge needs --judge-model (the judge's model name)")
        cfg.judge = {"kind": args.judge, "model": args.judge_model}
        if args.judge_base_url:
            cfg.judge["base_url"] = args.judge_base_url
        if args.judge_api_key_env:
            cfg.judge["api_key_env"] = args.judge_api_key_env
    return cfg.check()


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = parse_auth(args.auth)
    cfg = config_from_args(args)
    import torch

    from loraloom.app.ui.config import default_threads

    torch.set_num_threads(args.threads or default_threads())
    if (args.share or args.host not in ("127.0.0.1", "localhost", "::1")) and auth is None:
        print("loraloom ui: warning: reachable from other machines without a login; consider --auth USER:PASS",
              file=sys.stderr)
    print(f"loraloom ui: {cfg.name}: model {cfg.models[0]}, LoRAs from {', '.join(map(str, cfg.lora_dirs))}; loading …",
          flush=True)
    from loraloom.app.ui.app import build_app, launch

    demo = build_app(cfg)
    # The first model loads while the server starts; a generation asked for meanwhile waits for it.
    threading.Thread(target=_preload, args=(demo.service, cfg.models[0]), name="loraloom-preload", daemon=True).start()
    launch(demo, cfg, host=args.host, port=args.port or None, auth=auth, share=args.share)
    return 0


def _preload(service, model: str) -> None:
    try:
        service.pipeline(model)
        print(f"loraloom ui: model ready: {model}", flush=True)
    except Exception as err:  # the page shows the same error when a generation asks for the model
        print(f"loraloom ui: warning: the model {model} did not load: {err}", file=sys.stderr, flush=True)
