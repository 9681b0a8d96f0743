"""On CUDA: the routing layer and whole generations in float16 on the GPU against float32 on the CPU.

Marker `gpu`: conftest skips these, saying why, where `torch.cuda.is_available()` is false, and runs them where it
is true. The models are the tiny offline SD 1.x pipeline (`tiny:sd1`, built on the CPU from a fixed seed, so both
devices hold the same weights) and three random LoRAs written once for both.

Tolerances. float16 keeps 11 significant bits (unit roundoff 2**-11 = 4.9e-4). Every layer rounds its activations
and weights to that, so a UNet output of magnitude ~1.5 carries an absolute error of a few 1e-3 after ~25 layers; the
LoRA factors are rounded too, and a fused weight W + delta is rounded once more. A generation adds classifier-free
guidance ((1 - g) eps_u + g eps_c: up to 2g - 1 times one branch's error) and scheduler steps that carry the error
forward; these random tiny models end with latents of magnitude ~55, so latents are compared relative to
their largest value. Measured with this module's code run in float16 on the CPU (every op's output rounded to
float16 as on CUDA; only the kernels' summation order differs): one routed UNet call at most
7e-3 absolute (the grouped branch matmuls; 2.5e-3 for the others, 2.4e-3 without LoRAs), a fused UNet 3e-3; a 4-step
generation with guidance 5 at most 3.5e-3 relative (euler-a; merge 2.5e-3, composite 1.8e-3); decoded images at most
1 uint8 level. The tolerances are about 3-4x those (CUDA kernels may reduce in another order, and cuBLAS may reduce
split sums in float16), and each test also checks that what the LoRAs change is at least 5x the tolerance (measured:
12-36% of the latents' scale, 0.19-0.68 on a UNet row), so a LoRA that silently does not apply on CUDA fails.
"""

from __future__ import annotations

import pytest
import torch
from conftest import weights_hash

from loraloom.composition import Routing
from loraloom.pipelines import ComposedPipeline

pytestmark = pytest.mark.gpu

DEVICE, DTYPE = "cuda", "float16"
NAMES = ("char", "style", "bg")
UNET_TOL = 2e-2  # one UNet call, float16 vs float32, absolute (outputs of magnitude ~1.5; see the module docstring)
LATENT_RTOL = 1.5e-2  # final latents of a 4-step generation with guidance 5: max |error| / max |CPU latents|
PIXEL_TOL = 4  # decoded images, uint8 levels (the VAE decodes the float16 latents, themselves within LATENT_RTOL)
STEPS, GUIDANCE = 4, 5.0
LORAS = (("char", 1.0), ("style", 0.8), ("bg", 0.6))


def _pipeline(paths, device="cpu", dtype="float32") -> ComposedPipeline:
    cp = ComposedPipeline.from_pretrained("tiny:sd1", device=device, dtype=dtype)
    for name, path in paths.items():
        cp.load_lora(path, name)  # loaded per pipeline: `add_lora` moves a LoRA's factors to the model's device and dtype
    return cp


@pytest.fixture(scope="module")
def lora_paths(tmp_path_factory):
    from loraloom.pipelines.tiny import build_tiny_sd, write_random_lora

    folder = tmp_path_factory.mktemp("gpu-loras")
    pipe = build_tiny_sd()
    # std 0.3 (strong LoRAs): what they change is many times what float16 rounding changes
    return {name: write_random_lora(pipe, folder / f"{name}.safetensors", seed=i + 1, alpha=2.0 + i, std=0.3)
            for i, name in enumerate(NAMES)}


@pytest.fixture(scope="module")
def pipelines(lora_paths):
    """(CPU float32, DEVICE DTYPE) pipelines with the same weights and the same three LoRAs."""
    cpu, dev = _pipeline(lora_paths), _pipeline(lora_paths, DEVICE, DTYPE)
    assert dev.device.type == torch.device(DEVICE).type and dev.dtype == getattr(torch, DTYPE)
    return cpu, dev


def _generate(cp, method, params, scheduler, loras=LORAS, output_type="latent"):
    # seed=: the pipeline draws the initial noise (and euler-a's step noise) from its CPU generator and moves it to
    # the device, so both devices start from the same latents.
    return cp("a red star", negative_prompt="blurry", loras=list(loras), method=method, method_params=params,
              num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=7, scheduler=scheduler, output_type=output_type,
              progress_bar=False)


CASES = {
    "merge-fused": ("merge", {"fuse": True}, "dpmsolver++"),
    "merge-unfused": ("merge", {"fuse": False}, "dpmsolver++"),
    "composite": ("composite", {}, "dpmsolver++"),
    "merge-unfused-euler-a": ("merge", {"fuse": False}, "euler-a"),  # a sampler that draws noise at every step
}


def _generation_errors(pipelines, case) -> tuple[float, float]:
    """(max |device - CPU|, max |CPU with LoRAs - CPU without|) of the final latents, over max |CPU latents|."""
    cpu, dev = pipelines
    method, params, scheduler = CASES[case]
    ref = _generate(cpu, method, params, scheduler).latents
    out = _generate(dev, method, params, scheduler).latents
    assert out.device.type == dev.device.type and out.dtype == dev.dtype
    no_lora = _generate(cpu, "merge", {}, scheduler, loras=()).latents
    scale = ref.abs().max().item()
    return (out.float().cpu() - ref).abs().max().item() / scale, (ref - no_lora).abs().max().item() / scale


@pytest.mark.parametrize("case", list(CASES))
def test_generation_cuda_fp16_matches_cpu_fp32(pipelines, case):
    err, effect = _generation_errors(pipelines, case)
    assert err < LATENT_RTOL, f"{case}: CUDA float16 latents differ from CPU float32 by {err:.3g} (relative)"
    assert effect > 5 * LATENT_RTOL  # the LoRAs change the result far more than the tolerance


def _unet_inputs(rows: int, seed: int = 0):
    g = torch.Generator("cpu").manual_seed(seed)  # drawn on the CPU in float32, then moved: the same inputs everywhere
    return torch.randn(rows, 4, 16, 16, generator=g), torch.randn(rows, 77, 32, generator=g)


def _unet(cp, x, ctx, t=500):
    device, dtype = cp.device, cp.dtype
    out = cp.pipe.unet(x.to(device, dtype), torch.tensor(t, device=device), encoder_hidden_states=ctx.to(device, dtype))
    return out.sample.float().cpu()


PLANS = {
    # mixed blocks: the per-term loop (in-place addmm_ on a row slice), an empty block, a negative gate
    "blocks": [(2, {"char": 0.8}), (1, {"style": 1.0, "bg": 0.5}), (1, {}), (1, {"bg": -0.7})],
    # equal-sized one-adapter blocks (Composite's branches): the grouped batched-matmul path
    "grouped": [(2, {"char": 0.8}), (2, {"style": 0.9}), (2, {"bg": 1.0})],
}


def _router_outputs(pipelines, plan):
    """[(routed UNet output, base UNet output)] per pipeline, for the same inputs and routing."""
    routing = Routing.from_blocks(PLANS[plan])
    x, ctx = _unet_inputs(routing.num_rows)
    outs = []
    for cp in pipelines:
        router = cp.routers["unet"]
        with torch.no_grad():
            router.set_routing(routing)
            try:
                grouped = any(r.grouped is not None for r in router.layers.values())
                routed = _unet(cp, x, ctx)
            finally:
                router.set_routing(None)
            base = _unet(cp, x, ctx)
        assert grouped == (plan == "grouped")
        outs.append((routed, base))
    return outs


@pytest.mark.parametrize("plan", list(PLANS))
def test_router_rows_cuda_fp16_match_cpu_fp32(pipelines, plan):
    (ref, ref_base), (got, got_base) = _router_outputs(pipelines, plan)
    err = (got - ref).abs().max().item()
    assert err < UNET_TOL, f"{plan}: routed UNet output on CUDA float16 differs from CPU float32 by {err:.3g}"
    assert (got_base - ref_base).abs().max().item() < UNET_TOL
    row = 0
    for n, gates in PLANS[plan]:  # each block: its LoRAs matter (far beyond the tolerance), or it is the base model
        rows = slice(row, row + n)
        changed = (ref[rows] - ref_base[rows]).abs().max().item()
        if gates:
            assert changed > 5 * UNET_TOL
            assert (got[rows] - got_base[rows]).abs().max().item() > 5 * UNET_TOL
        else:  # (not bit-equal on CUDA: a kernel may reduce in another order for another batch content)
            assert changed == 0.0 and (got[rows] - got_base[rows]).abs().max().item() < UNET_TOL
        row += n


def test_fusing_on_cuda_fp16_matches_routing_and_restores_weights(pipelines):
    """`LoRARouter.fused` on float16 CUDA weights: the delta is computed in float32 and rounded into the weight
    once; the result matches the routed (unfused) forward, and the original weight tensors come back bit-exactly."""
    cpu, dev = pipelines
    router, unet = dev.routers["unet"], dev.pipe.unet
    gates = {"char": 0.8, "style": 0.6, "bg": -0.5}
    x, ctx = _unet_inputs(2, seed=3)
    before = weights_hash(unet)
    with torch.no_grad():
        router.set_routing(Routing.uniform(gates))
        try:
            routed = _unet(dev, x, ctx)
        finally:
            router.set_routing(None)
        with router.fused(gates):
            assert weights_hash(unet) != before
            fused = _unet(dev, x, ctx)
        cpu.routers["unet"].set_routing(Routing.uniform(gates))
        try:
            ref = _unet(cpu, x, ctx)
        finally:
            cpu.routers["unet"].set_routing(None)
    assert weights_hash(unet) == before
    assert (fused - routed).abs().max().item() < UNET_TOL
    assert (fused - ref).abs().max().item() < UNET_TOL


def test_decoded_images_cuda_fp16_match_cpu_fp32(pipelines):
    """The float16 VAE decode (upcast to float32 when the VAE asks for it, then back) gives the CPU's image."""
    import numpy as np

    cpu, dev = pipelines
    ref = _generate(cpu, "composite", {}, "dpmsolver++", output_type="pil").images[0]
    got = _generate(dev, "composite", {}, "dpmsolver++", output_type="pil").images[0]
    assert dev.pipe.vae.dtype == getattr(torch, DTYPE)  # an upcast for decoding is undone
    assert got.size == ref.size == (dev.default_size, dev.default_size)
    diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    assert diff.max() <= PIXEL_TOL and diff.mean() < 0.5, (diff.max(), diff.mean())
