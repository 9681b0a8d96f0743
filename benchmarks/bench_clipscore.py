"""CLIPScore throughput (images/s) on this machine, with random weights (nothing downloaded).

Times `CLIPScorer.score` end to end — decode nothing, but preprocess 512×512 PIL images (resize + centre crop),
encode images and texts, cosine — for a tiny CLIP (transformers and open_clip backends) and a ViT-B/16-shaped
open_clip model (`pretrained=None`, the architecture ComposLoRA scored with).

    .venv/bin/python benchmarks/bench_clipscore.py [--device cpu] [--batch-size 16] [--images 32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from loraloom.evaluation.clipscore import CLIPScorer, OpenCLIPEmbedder, TransformersCLIPEmbedder
from loraloom.evaluation.fakes import register_tiny_open_clip, tiny_clip_folder


def images_and_texts(n: int, size: int = 512):
    rng = np.random.default_rng(0)
    base = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(min(n, 8))]
    texts = ["girl, red, castle", "dog, watercolor style", "a photo of a cat", "blue castle, watercolor"]
    return [base[i % len(base)] for i in range(n)], [texts[i % len(texts)] for i in range(n)]


def throughput(scorer: CLIPScorer, n: int) -> float:
    images, texts = images_and_texts(n)
    scorer.score(images[: scorer.batch_size], texts[: scorer.batch_size])  # warm-up
    t0 = time.perf_counter()
    scorer.score(images, texts)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=32, help="images timed for ViT-B/16 (tiny models: 8×)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}, batch {args.batch_size}, 512×512 inputs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_hf = TransformersCLIPEmbedder(tiny_clip_folder(tmp), device=args.device)
        rows.append(("tiny CLIP (transformers, 32 px, 2 layers)", tiny_hf, args.images * 8))
        tiny_oc = OpenCLIPEmbedder(register_tiny_open_clip(tmp), pretrained=None, device=args.device)
        rows.append(("tiny CLIP (open_clip, 32 px, 2 layers)", tiny_oc, args.images * 8))
        rows.append(("ViT-B-16 (open_clip, 224 px, random weights)", OpenCLIPEmbedder("ViT-B-16", None, device=args.device),
                     args.images))
        for name, embedder, n in rows:
            rate = throughput(CLIPScorer(embedder, batch_size=args.batch_size), n)
            print(f"{name:48s} {rate:9.1f} images/s  ({n} images)")


if __name__ == "__main__":
    main()
