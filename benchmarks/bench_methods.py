"""Speed and memory of the composition methods, as ratios measured in one process (medians of repeats).

    python benchmarks/bench_methods.py                     # tiny SD model, seconds
    python benchmarks/bench_methods.py --model sd15-shape  # real SD 1.5 architecture, random weights, 256x256
    python benchmarks/bench_methods.py --model flux-shape  # FLUX.1 / SD 3.5 shapes: benchmarks/bench_dit.py

Times cover the denoising loop and prompt encoding (output_type="latent": VAE decoding, identical for every
method, is left out). The last lines printed are the ratios the issues ask for:

    switch_vs_single        our Switch / one fixed LoRA (our pipeline, unfused)            target <= 1.03
    composite_vs_reference  our Composite / a reference-style loop (diffusers set_adapters
                            per LoRA and one UNet call per LoRA per step, as ComposLoRA)   target <= 0.8
    composite_vs_limit      our Composite / (N x one single-LoRA generation)              target <= 1.05
    merge_vs_base           our Merge (fused) / the base model with no LoRA               target <= 1.05
    lora_memory_ratio       resident memory added by loading N LoRAs / their file sizes   target <= 1.3

followed by the lines of the method plug-ins `benchmarks/methods_<name>.py` (see BenchEnv).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import MODELS, builder, interleaved_medians, rss_bytes, write_loras

PROMPT = "a portrait of a character, detailed"


@dataclass
class BenchEnv:
    """What `benchmarks/methods_<name>.py` plug-ins get: the loaded pipelines and the shared settings."""

    model: str
    ours: object  # ComposedPipeline with LoRAs l0..l{N-1} resident
    reference: object  # diffusers pipeline with the same LoRAs loaded through PEFT
    lora_paths: list
    names: list
    kw: dict  # generation keyword arguments shared by every timed call
    prompt: str
    repeats: int
    clock: str  # "cpu" or "wall": the time the ratio lines use
    size: int
    steps: int
    rank: int
    single_seconds: float  # median of one fixed LoRA through our pipeline
    base_factory: object  # builds a fresh base diffusers pipeline of this model
NEGATIVE = "blurry"


def reference_composite(pipe, names, steps, guidance, size, seed, scale=0.8):
    """LoRA Composite as the reference pipeline computes it (pipeline_0.26.3.py, lora_composite=True):
    all adapters active for prompt encoding, then per step and per LoRA `set_adapters(that one)` + one UNet call."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.set_adapters(names)
    pos, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE, lora_scale=scale)
    embeds = torch.cat([neg, pos])
    sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor), generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            pipe.enable_lora()
            preds = []
            for name in names:
                pipe.set_adapters(name)
                x = sched.scale_model_input(torch.cat([latents] * 2), t)
                preds.append(pipe.unet(x, t, encoder_hidden_states=embeds, cross_attention_kwargs={"scale": scale}).sample)
            u, c = torch.stack(preds).mean(0).chunk(2)
            latents = sched.step(u + guidance * (c - u), t, latents).prev_sample
    return latents


def plugin_main(doc: str, measure, n_help: str, load_at_least: int = 0) -> None:
    """A plug-in run alone (`python benchmarks/methods_<name>.py`): its own LoRAs on the --model, its lines printed."""
    import argparse

    from benchmarks.common import MODELS, builder, write_loras
    from loraloom.pipelines import ComposedPipeline

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 9 on tiny, 5 otherwise, as bench_methods.py)")
    ap.add_argument("--n", type=int, default=3, help=n_help)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, size, steps, rank = MODELS[args.model]
    steps = args.steps or steps
    repeats = args.repeats or (9 if args.model == "tiny" else 5)
    base = builder(args.model)()
    base.set_progress_bar_config(disable=True)
    ours = ComposedPipeline(base)
    paths = write_loras(base, max(args.n, load_at_least), rank)
    names = [ours.load_lora(p, f"l{i}").name for i, p in enumerate(paths)]
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, seed=0, negative_prompt=NEGATIVE,
              output_type="latent", progress_bar=False, scheduler="dpmsolver++")
    env = BenchEnv(model=args.model, ours=ours, reference=None, lora_paths=paths, names=names[:args.n], kw=kw, prompt=PROMPT,
                   repeats=repeats, clock=args.clock, size=size, steps=steps, rank=rank, single_seconds=float("nan"),
                   base_factory=builder(args.model))
    print(f"model={args.model} size={size} steps={steps} rank={rank} N={args.n} repeats={repeats} threads={torch.get_num_threads()}")
    for name, value in measure(env):
        print(f"{name} {value:.4g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--repeats", type=int, help="timed rounds per function (default 9 on tiny, where one run is ~1 s "
                                                "and the noise of a shared machine is largest; 5 otherwise)")
    ap.add_argument("--n", type=int, default=3, help="number of LoRAs composed")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, so CPU time measures the work)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="time the ratios use: process CPU time (default; robust on a shared machine) or wall clock")
    ap.add_argument("--plugins", default="all",
                    help="which benchmarks/methods_<name>.py plug-ins run: 'all' (default), 'none', or names, e.g. "
                         "'klora_hypernet,clora_cmlora'")
    args = ap.parse_args()
    available = sorted(m.name[len("methods_"):] for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                       if m.name.startswith("methods_"))
    plugins = available if args.plugins == "all" else [] if args.plugins == "none" else args.plugins.split(",")
    unknown = sorted(set(plugins) - set(available))
    if unknown:
        ap.error(f"unknown plug-in(s) {unknown}; available: {available}")
    torch.set_num_threads(args.threads)
    _, size, steps, rank = MODELS[args.model]
    steps = args.steps or steps
    args.repeats = args.repeats or (9 if args.model == "tiny" else 5)
    from loraloom.pipelines import ComposedPipeline

    print(f"model={args.model} size={size} steps={steps} rank={rank} N={args.n} repeats={args.repeats} threads={torch.get_num_threads()}")
    base = builder(args.model)()
    base.set_progress_bar_config(disable=True)
    paths = write_loras(base, args.n, rank)
    file_bytes = sum(p.stat().st_size for p in paths)

    # Memory: resident bytes added by making the N LoRAs resident in our routing layer.
    ours = ComposedPipeline(copy.deepcopy(base))
    from loraloom.composition import load_lora

    load_lora(paths[0])  # discarded: the first load imports converters; that is code, not memory added per LoRA
    before = rss_bytes()
    for i, p in enumerate(paths):
        ours.load_lora(p, f"l{i}")
    after = rss_bytes()
    factor_bytes = sum(l.nbytes for l in ours.loras.values())
    names = [f"l{i}" for i in range(args.n)]

    reference = base  # diffusers + PEFT, the ComposLoRA way of holding LoRAs
    for i, p in enumerate(paths):
        reference.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=f"l{i}")

    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, seed=0, negative_prompt=NEGATIVE,
              output_type="latent", progress_bar=False, scheduler="dpmsolver++")

    def our(method, loras, **params):
        return lambda: ours(PROMPT, loras=loras, method=method, method_params=params, **kw)

    def diffusers_single():
        reference.set_adapters(["l0"])
        g = torch.Generator("cpu").manual_seed(0)
        reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                  generator=g, output_type="latent", cross_attention_kwargs={"scale": 0.8})

    fns = {
        "base": our("merge", []),
        "single": our("merge", ["l0"], fuse=False),
        "switch": our("switch", names),
        "composite": our("composite", names),
        "merge_fused": our("merge", names),
        "reference_composite": lambda: reference_composite(reference, names, steps, 7.5, size, 0),
        "diffusers_single": diffusers_single,
    }
    # Correctness guard: our Composite and the reference loop must agree (same math) before timing them.
    ref_lat = reference_composite(reference, names, steps, 7.5, size, 0)
    our_lat = ours(PROMPT, loras=names, method="composite", method_params={"reference_text_encoding": True}, **kw).latents
    agree = (ref_lat - our_lat).abs().max().item()
    print(f"check: |our composite (reference text encoding) - reference loop| max = {agree:.2e}")

    timings = interleaved_medians(fns, repeats=args.repeats)
    for name, t in timings.items():
        print(f"time {name:20s} wall {t.wall:8.3f} s  cpu {t.cpu:8.3f} s  wall runs {[round(x, 3) for x in t.walls]}")
    res = {name: t.get(args.clock) for name, t in timings.items()}
    print(f"clock {args.clock}")
    single = res["single"]
    print(f"info single_vs_diffusers_single {single / res['diffusers_single']:.3f}")
    print(f"info lora_factor_bytes_ratio {factor_bytes / file_bytes:.3f} ({factor_bytes} factor bytes, {file_bytes} file bytes)")
    # Methods added later contribute their own measurements: benchmarks/methods_<name>.py with
    # `measure(env) -> list[(line_name, value)]`, where env holds what was built above.
    env = BenchEnv(model=args.model, ours=ours, reference=reference, lora_paths=paths, names=names, kw=kw, prompt=PROMPT,
                   repeats=args.repeats, clock=args.clock, size=size, steps=steps, rank=rank, single_seconds=single, base_factory=builder(args.model))
    extra = []
    for name in plugins:
        extra += importlib.import_module(f"benchmarks.methods_{name}").measure(env)
    print(f"switch_vs_single {res['switch'] / single:.3f}")
    print(f"composite_vs_reference {res['composite'] / res['reference_composite']:.3f}")
    print(f"composite_vs_limit {res['composite'] / (args.n * single):.3f}")
    print(f"merge_vs_base {res['merge_fused'] / res['base']:.3f}")
    print(f"lora_memory_ratio {(after - before) / file_bytes:.3f}")
    for name, value in extra:
        print(f"{name} {value:.4g}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if any(a in ("flux-shape", "sd35-shape", "flux-tiny", "sd3-tiny") or a.startswith("--model=") and a.split("=", 1)[1] in
           ("flux-shape", "sd35-shape", "flux-tiny", "sd3-tiny") for a in sys.argv[1:]):
        from benchmarks.bench_dit import main as dit_main  # the diffusion-transformer families: same ratio lines

        dit_main()
    else:
        main()
