"""Shared pieces of the benchmark scripts: model builders (tiny, SD 1.5-shaped) and timing helpers."""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Timing:
    """Medians of wall-clock and process CPU time over repeated runs (seconds)."""

    wall: float
    cpu: float
    walls: list[float]
    cpus: list[float]

    def get(self, clock: str) -> float:
        return self.cpu if clock == "cpu" else self.wall


def interleaved_medians(fns: dict, repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions round-robin (A B C, A B C, ...) so drift in machine load hits all of them alike.

    Both clocks are kept: on a machine shared with other jobs, wall time measures the neighbours too, while the
    process CPU time of a single-threaded run (`torch.set_num_threads(1)`) measures the work itself.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    walls = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - w)
            cpus[name].append(time.process_time() - c)
    return {k: Timing(statistics.median(walls[k]), statistics.median(cpus[k]), walls[k], cpus[k]) for k in fns}


def rss_bytes() -> int:
    import psutil

    gc.collect()
    return psutil.Process(os.getpid()).memory_info().rss


def build_sd15_shape(seed: int = 0):
    """The real SD 1.5 architecture (UNet 860 M, CLIP ViT-L/14 text encoder, VAE) from config, random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraloom.pipelines.tiny import tiny_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    tok = tiny_clip_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)


MODELS = {
    # name: (builder, size, steps, rank)
    "tiny": ("loraloom.pipelines.tiny:build_tiny_sd", 64, 10, 8),
    "sd15-shape": ("benchmarks.common:build_sd15_shape", 256, 4, 8),
}


def builder(name: str):
    mod, fn = MODELS[name][0].split(":")
    import importlib

    return getattr(importlib.import_module(mod), fn)


def write_loras(pipe, n: int, rank: int, folder: Path | None = None, text_encoder: bool = True) -> list[Path]:
    """n random rank-r LoRAs on the attention projections (UNet and text encoder), diffusers/PEFT layout, fp32."""
    from loraloom.pipelines.tiny import write_random_lora

    folder = Path(folder or tempfile.mkdtemp(prefix="loraloom-bench-"))
    return [write_random_lora(pipe, folder / f"lora{i}.safetensors", seed=i + 1, rank=rank, alpha=float(rank),
                              text_encoder=text_encoder, std=0.02) for i in range(n)]
