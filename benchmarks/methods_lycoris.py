"""LyCORIS adapter types in `benchmarks/bench_methods.py` (a method plug-in; also runnable alone).

    lokr_vs_lora          a LoKr / a LoRA with the same number of parameters on the same layers (the attention
                          projections of the UNet and text encoder, as the core bench's LoRAs), one generation each,
                          Merge unfused (every step through the routed forward: LoKr by reshapes, ΔW never formed)
                                                                                                     target <= 1.15
    loha_vs_lora          the same for a LoHa (its exact rank-r² form, or a cached dense ΔW where that is smaller)
                                                                                                     target <= 1.25
    lycoris_memory_ratio  resident memory added by loading LoKr and LoCon files (all UNet blocks incl. convolutions,
                          and the text encoder) / their file sizes                                   target <= 1.3

Info lines: the resident caches of the types that build one while loaded (`LoRA.cache_nbytes`: LoHa's rank-r² or
dense form, DoRA's row scales or dense W' - W, OFT's R - I), absolute and per file byte; DoRA and OFT unfused against
a LoRA of the same layers; the factor bytes of the memory files; wall-clock variants of the ratios.

Files are written by lycoris-lora's own network code (the `dev` extra); without it the plug-in reports nothing.
Times are process CPU time of one-threaded runs (medians, interleaved), as the core lines.

    python benchmarks/methods_lycoris.py --model tiny
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

ATTENTION = '''enable_conv = false
unet_target_module = ["Attention"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention"]
text_encoder_target_name = []
'''
ALL_BLOCKS = '''enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
'''


def lycoris_file(pipe, folder: Path, name: str, algo: str, dim: int, alpha: float, preset: str, seed: int = 0,
                 std: float = 0.02, **kw) -> tuple[Path, int]:
    """A LyCORIS network made and saved by lycoris-lora (kohya key names) on copies of the pipeline's UNet and text
    encoder, its parameters moved by seeded noise; returns (file, number of parameters)."""
    from lycoris import kohya

    preset_path = folder / f"{name}.toml"
    preset_path.write_text(preset)
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    cls = kohya.LycorisNetworkKohya
    saved = {k: v for k, v in vars(cls).items() if k.isupper()}
    try:
        net = kohya.create_network(1.0, dim, alpha, None, te, unet, algo=algo, preset=str(preset_path), **kw)
    finally:
        for k, v in saved.items():
            setattr(cls, k, v)
    net.apply_to(te, unet, True, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    path = folder / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return path, sum(p.numel() for p in net.parameters())


def measure(env) -> list[tuple[str, float]]:
    try:
        import lycoris  # noqa: F401
    except ImportError:
        print("info methods_lycoris: lycoris-lora is not installed (pip install -e .[dev]); no LyCORIS lines", flush=True)
        return []
    from benchmarks.common import interleaved_medians, rss_bytes

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    folder = Path(tempfile.mkdtemp(prefix="loraloom-bench-lycoris-"))
    pipe, ours = env.ours.pipe, env.ours
    # LoKr (LyCORIS defaults: factor -1, the larger side factorised where its rank allows) and LoHa at rank r, each
    # against a LoRA with as many parameters on the same layers
    lokr, p_lokr = lycoris_file(pipe, folder, "bench_lokr", "lokr", 4, 4.0, ATTENTION, seed=1)
    loha, p_loha = lycoris_file(pipe, folder, "bench_loha", "loha", 4, 4.0, ATTENTION, seed=2)
    _, p_rank1 = lycoris_file(pipe, folder, "rank1", "lora", 1, 1.0, ATTENTION)
    r_lokr, r_loha = max(1, round(p_lokr / p_rank1)), max(1, round(p_loha / p_rank1))
    lora_k, _ = lycoris_file(pipe, folder, "bench_lora_k", "lora", r_lokr, float(r_lokr), ATTENTION, seed=3)
    lora_h, _ = lycoris_file(pipe, folder, "bench_lora_h", "lora", r_loha, float(r_loha), ATTENTION, seed=4)
    dora, _ = lycoris_file(pipe, folder, "bench_dora", "lora", r_loha, float(r_loha), ATTENTION, seed=5, dora_wd=True)
    oft, _ = lycoris_file(pipe, folder, "bench_oft", "diag-oft", 4, 0.0, ATTENTION, seed=6, std=0.01)
    print(f"info lycoris params: LoKr {p_lokr} (LoRA rank {r_lokr}), LoHa {p_loha} (LoRA rank {r_loha})", flush=True)
    names = {"lokr": lokr, "loha": loha, "lora_k": lora_k, "lora_h": lora_h, "dora": dora, "oft": oft}
    loaded = [ours.load_lora(p, f"ly_{n}").name for n, p in names.items()]
    try:
        fns = {n: (lambda n=n: ours(env.prompt, loras=[f"ly_{n}"], method="merge", method_params={"fuse": False}, **env.kw))
               for n in names}
        res = interleaved_medians(fns, repeats=env.repeats)
        for n, t in res.items():
            print(f"time {'ly_' + n:20s} wall {t.wall:8.3f} s  cpu {t.cpu:8.3f} s", flush=True)
        caches = {n: ours.loras[f"ly_{n}"].cache_nbytes for n in ("loha", "dora", "oft")}
        sizes = {n: p.stat().st_size for n, p in names.items()}
    finally:
        for n in loaded:
            ours.remove_lora(n)

    # memory: several LoKr and LoCon files over every UNet block (convolutions included) and the text encoder
    files = []
    for i in range(3):
        files.append(lycoris_file(pipe, folder, f"mem_lokr{i}", "lokr", 8, 8.0, ALL_BLOCKS, seed=10 + i)[0])
        files.append(lycoris_file(pipe, folder, f"mem_locon{i}", "lora", 8, 8.0, ALL_BLOCKS, seed=20 + i)[0])
    from loraloom.composition import load_lora

    load_lora(files[0], unet_config=pipe.unet.config)  # discarded: the first load imports code
    before = rss_bytes()
    mem = [ours.load_lora(p, f"mem_{p.stem}").name for p in files]
    after = rss_bytes()
    file_bytes = sum(p.stat().st_size for p in files)
    factor_bytes = sum(ours.loras[n].nbytes + ours.loras[n].cache_nbytes for n in mem)
    for n in mem:
        ours.remove_lora(n)

    clock, other = env.clock, "wall" if env.clock == "cpu" else "cpu"

    def ratio(a, b, c=clock):
        return res[a].get(c) / res[b].get(c)

    lines = [(f"info lokr_vs_lora_{other}", ratio("lokr", "lora_k", other)),
             (f"info loha_vs_lora_{other}", ratio("loha", "lora_h", other)),
             ("info dora_vs_lora", ratio("dora", "lora_h")), ("info oft_vs_lora", ratio("oft", "lora_h")),
             ("info lycoris_factor_bytes_ratio", factor_bytes / file_bytes)]
    for n, b in caches.items():
        print(f"info {n} resident cache {b} bytes ({b / sizes[n]:.2f} x its file of {sizes[n]} bytes)", flush=True)
        lines += [(f"info {n}_cache_bytes", b), (f"info {n}_cache_per_file_byte", b / sizes[n])]
    lines += [("lokr_vs_lora", ratio("lokr", "lora_k")), ("loha_vs_lora", ratio("loha", "lora_h")),
              ("lycoris_memory_ratio", (after - before) / file_bytes)]
    return lines


def main() -> None:
    import argparse

    from benchmarks.bench_methods import PROMPT, BenchEnv
    from benchmarks.common import MODELS, builder
    from loraloom.pipelines import ComposedPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, size, steps, rank = MODELS[args.model]
    ours = ComposedPipeline(builder(args.model)())
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, seed=0, negative_prompt="blurry",
              output_type="latent", progress_bar=False, scheduler="dpmsolver++")
    env = BenchEnv(model=args.model, ours=ours, reference=None, lora_paths=[], names=[], kw=kw, prompt=PROMPT,
                   repeats=args.repeats, clock="cpu", size=size, steps=steps, rank=rank, single_seconds=float("nan"),
                   base_factory=builder(args.model))
    print(f"model={args.model} size={size} steps={steps} repeats={args.repeats} threads={torch.get_num_threads()}")
    for name, value in measure(env):
        print(f"{name} {value:.4g}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
