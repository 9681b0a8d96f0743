"""`loraloom eval DIR`: score the loraloom PNGs of a folder (CLIPScore; MLLM judge pairwise between methods)."""

from __future__ import annotations

import math
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a folder of generated images (CLIPScore, MLLM judge)",
        description="Score every loraloom PNG in DIR from the spec it carries: CLIPScore per image, and with --pairwise "
                    "an MLLM judge comparing methods on the same set and seed (ComposLoRA's protocol). Writes "
                    "loraloom_scores.csv/.jsonl (and loraloom_pairwise.csv/.jsonl) next to the images. "
                    "See docs/evaluation.md.")
    p.add_argument("dir", help="folder of PNGs written by loraloom")
    p.add_argument("--out", help="where to write the score files (default: DIR)")
    p.add_argument("--recursive", action="store_true", help="also score PNGs in subfolders")
    g = p.add_argument_group("CLIPScore")
    g.add_argument("--clip", default=None,
                   help="CLIP model: a local transformers folder, a hub id already in the local cache, "
                        "'open_clip:ARCH@TAG' or 'open_clip:ARCH@/path/checkpoint' (default: the toy world's own CLIP "
                        "when every image comes from the shipped toy world, else openai/clip-vit-base-patch16)")
    g.add_argument("--no-clip", action="store_true", help="skip CLIPScore")
    g.add_argument("--clip-scale", type=float, default=100.0,
                   help="w in w*max(cos,0): 100 (torchmetrics, ComposLoRA; default) or 2.5 (Hessel et al.)")
    g.add_argument("--clip-text", choices=("triggers", "prompt"), default="triggers",
                   help="score against the LoRAs' trigger words (ComposLoRA; default) or the full prompt")
    g.add_argument("--long-text", choices=("truncate", "error"), default="truncate",
                   help="texts over the CLIP context: cut with a warning and a flag (default), or stop")
    g.add_argument("--batch-size", type=int, default=16, help="images per CLIP batch (default: %(default)s)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda when available)")
    g.add_argument("--allow-download", action="store_true",
                   help="let loraloom download models that are not in the local caches (--clip hub ids and open_clip "
                        "tags, the --judge transformers model); without it lookups are local only and a missing "
                        "model fails at once")
    j = p.add_argument_group("MLLM judge")
    j.add_argument("--judge", choices=("openai", "transformers"),
                   help="openai: any OpenAI-compatible chat API with images (OpenAI, vLLM, Ollama); "
                        "transformers: a local vision-language model folder")
    j.add_argument("--judge-model", help="model name on the server, or the local VLM folder / cached hub id")
    j.add_argument("--base-url", default="https://api.openai.com/v1",
                   help="chat API base URL (default: %(default)s; vLLM: http://localhost:8000/v1, Ollama: http://localhost:11434/v1)")
    j.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the environment variable holding the API key (default: %(default)s)")
    j.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 1.0 for openai as ComposLoRA; greedy for transformers)")
    j.add_argument("--max-tokens", type=int, default=2048, help="answer length limit (default: %(default)s)")
    j.add_argument("--seed", type=int, default=None, help="decoding seed, where the server supports it")
    j.add_argument("--json-mode", action="store_true", help="ask the server for response_format=json_object")
    j.add_argument("--image-max-side", type=int, default=None, help="downscale images sent to the judge")
    j.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    j.add_argument("--retries", type=int, default=3, help="retries per request on timeouts, HTTP 429/5xx (default: %(default)s)")
    j.add_argument("--cache", help="judge cache file (append-only JSONL; default DIR/loraloom_judge_cache.jsonl)")
    j.add_argument("--pairwise", action="store_true", help="compare methods pairwise on the same set and seed")
    j.add_argument("--baseline", help="compare every method against this one (default: merge when present, else all pairs)")
    j.add_argument("--one-order", action="store_true", help="ask each pair in one order only (cheaper, position-biased)")
    j.add_argument("--workers", type=int, default=1, help="comparisons sent at once (openai judge only; default: %(default)s)")
    j.add_argument("--reask", type=int, default=2, help="re-asks after an unparseable answer (default: %(default)s)")
    p.set_defaults(func=run)


def build_judge(args):
    from loraloom.evaluation.errors import EvaluationError

    if not args.judge_model:
        raise EvaluationError("--judge needs --judge-model (a model name, or a local VLM folder)")
    if args.judge == "openai":
        from loraloom.evaluation.judges.openai_chat import OpenAIChatJudge

        return OpenAIChatJudge(args.judge_model, base_url=args.base_url, api_key_env=args.api_key_env,
                               temperature=1.0 if args.temperature is None else args.temperature,
                               max_tokens=args.max_tokens, seed=args.seed, json_mode=args.json_mode,
                               image_max_side=args.image_max_side, timeout=args.timeout, max_retries=args.retries)
    from loraloom.evaluation.judges.local_vlm import TransformersVLMJudge

    sample = args.temperature is not None and args.temperature > 0
    return TransformersVLMJudge(args.judge_model, device=args.device, max_new_tokens=args.max_tokens, do_sample=sample,
                                temperature=args.temperature if sample else None, seed=args.seed or 0,
                                image_max_side=args.image_max_side, local_files_only=not args.allow_download)


def choose_clip(clip: str | None, images) -> str:
    """--clip when given; else the toy world's own CLIP when every image comes from the shipped toy world (said on
    stdout), else the default CLIP. The rule is `loraloom.evaluation.scoring.is_toyworld_model`."""
    from loraloom.evaluation.clipscore import DEFAULT_CLIP
    from loraloom.evaluation.scoring import toyworld_clip_for

    if clip is not None:
        return clip
    toy_clip, toy = toyworld_clip_for(images)
    if toy_clip is not None:
        print(f"CLIP: the toy world's own CLIP ({toy_clip}), as every image comes from the shipped toy world "
              "(--clip picks another)")
        return str(toy_clip)
    if toy:
        print(f"CLIP: {DEFAULT_CLIP}: {toy} of {len(images)} images come from the toy world and the others do not; "
              "one CLIP scores the whole folder (--clip picks another)", file=sys.stderr)
    return DEFAULT_CLIP


def _fmt(x, digits=2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def run(args) -> int:
    from loraloom.evaluation.cache import JudgeCache
    from loraloom.evaluation.clipscore import CLIPScorer
    from loraloom.evaluation.errors import EvaluationError
    from loraloom.evaluation.protocols import ComposLoRAPairwise
    from loraloom.evaluation.scoring import JUDGE_CACHE, evaluate_folder, format_table, no_images_error, scan_folder

    if args.judge and not args.pairwise:
        raise EvaluationError("--judge is used by --pairwise; add --pairwise")
    if args.pairwise and not args.judge:
        raise EvaluationError("--pairwise needs a judge: --judge openai|transformers --judge-model …")
    if args.pairwise and args.judge == "openai":
        from loraloom.evaluation.judges.openai_chat import check_base_url

        check_base_url(args.base_url)
    # a bad folder, unreadable PNGs or no loraloom PNG at all fail here, before any model loads
    scanned = scan_folder(args.dir, recursive=args.recursive)
    if not scanned[0]:
        raise no_images_error(args.dir, scanned[1])
    if not args.verbose:  # transformers' "Loading weights" bars say nothing useful here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    scorer = None
    if not args.no_clip:
        clip = choose_clip(args.clip, scanned[0])
        scorer = CLIPScorer.load(clip, device=args.device, local_files_only=not args.allow_download,
                                 scale=args.clip_scale, batch_size=args.batch_size, long_text=args.long_text)
    protocol = judge = None
    if args.pairwise:
        judge = build_judge(args)
        cache = JudgeCache(args.cache or os.path.join(args.out or args.dir, JUDGE_CACHE))
        protocol = ComposLoRAPairwise(judge, cache, reask=args.reask, both_orders=not args.one_order)

    def progress(i, n, what):
        print(f"\r[{i}/{n}] {what}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    report = evaluate_folder(args.dir, scorer=scorer, text_mode=args.clip_text, protocol=protocol, baseline=args.baseline,
                             out_dir=args.out, recursive=args.recursive, progress=progress,
                             workers=args.workers if args.judge == "openai" else 1, scanned=scanned)
    if report.skipped:
        print(f"skipped {len(report.skipped)} PNG(s) without a loraloom spec", file=sys.stderr)
    if scorer is not None:
        d = scorer.describe()
        print(f"CLIPScore = {d['scale']:g}·max(cos,0), {d['backend']} {d['model']}, text: {args.clip_text}")
    print(format_table([[m["method"], m["images"], m["scored"], _fmt(m["clip_mean"]), _fmt(m["clip_std"]), m["truncated"]]
                        for m in report.methods], ["method", "images", "scored", "CLIPScore", "std", "truncated"]))
    if protocol is not None:
        rows = []
        for s in report.pairwise:
            for dim in ("composition", "image_quality"):
                t = s[dim]
                rows.append([f"{s['method_a']} vs {s['method_b']}", dim, s["comparisons"] - s["failed"], s["failed"],
                             f"{t['win']}/{t['tie']}/{t['lose']}",
                             "/".join(f"{100 * t[k + '_rate']:.0f}%" if not math.isnan(t[k + "_rate"]) else "-"
                                      for k in ("win", "tie", "lose")),
                             _fmt(t["mean_a"]), _fmt(t["mean_b"])])
        print()
        print(f"Pairwise ({protocol.template.id}, judge {judge.model}, "
              f"{'both orders' if protocol.both_orders else 'one order'}):")
        print(format_table(rows, ["comparison", "dimension", "judged", "failed", "win/tie/lose", "rates", "mean A", "mean B"]))
        a = report.judge_answers
        print(f"judge: {a['read']} answers read, {a['cached']} from the cache; {judge.requests_sent} requests sent")
    print("wrote " + ", ".join(str(f) for f in report.files))
    return 0
