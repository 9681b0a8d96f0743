"""Merge on the diffusion transformers fuses only the layers where fusing costs less than routing over the run
(`composition.fuse_cost`): the inequality at FLUX.1's widths, the choice on a tiny FLUX run (text-stream layers see
512 tokens per call and are fused; image-stream layers see 4 and the modulations one vector, so they stay routed),
and that a partly fused run computes what the fully routed run and diffusers' own LoRA do."""

from __future__ import annotations

import pytest
import torch
from dit_references import FLUX_TARGETS, diffusers_latents, write_peft_lora

from loraloom.composition.fuse_cost import fusing_pays, token_rows
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny_dit import build_tiny_flux

PROMPT, STEPS, GUIDANCE, TOL = "a red cat, ink wash", 2, 3.5, 1e-5
pytestmark = pytest.mark.fuse_cost


def test_the_inequality_at_flux_widths():
    # FLUX.1 1024², 28 steps: 4096 image tokens; every layer that sees tokens is worth fusing at rank 48 (3 LoRAs × 16)
    full = token_rows("image", 4096, 512, calls=28, rows=1)
    assert full == 4096 * 28 and fusing_pays(3072, 3072, 48, full) and fusing_pays(12288, 3072, 48, full)
    # 256², 4 steps (bench_dit's flux-shape): 256 image tokens; the image-stream attention projections stay routed
    short = token_rows("image", 256, 512, calls=4, rows=1)
    assert short == 1024 and not fusing_pays(3072, 3072, 48, short)
    joint = token_rows("joint", 256, 512, calls=4, rows=1)  # single-stream: 768 tokens, not enough either
    assert not fusing_pays(3072, 3072, 48, joint) and not fusing_pays(12288, 3072, 48, joint)
    assert fusing_pays(3072, 3072, 48, token_rows("joint", 1024, 512, calls=4, rows=1))  # 512²: 1536 tokens
    # the modulations see one vector per row: never worth fusing, however long the run
    assert token_rows(None, 4096, 512, calls=50, rows=2) == 100 and not fusing_pays(18432, 3072, 48, 100)
    assert token_rows("joint", 10, 20, calls=3, rows=2) == 180 and token_rows("text", 10, 20, calls=3, rows=2) == 120


def _setup(tmp_path):
    pipe = build_tiny_flux(0)
    path = write_peft_lora(pipe, tmp_path, "a", seed=3, text_encoder=False, targets=FLUX_TARGETS)
    cp = ComposedPipeline(build_tiny_flux(0))
    cp.load_lora(path)
    return cp, path


def _run(cp, fuse, callback=None):
    kwargs = {"callback_on_step_end": callback} if callback else {}
    return cp(PROMPT, loras=["a"], method="merge", method_params={"lora_scale": 1.0, "fuse": fuse}, num_inference_steps=STEPS,
              height=32, width=32, guidance_scale=GUIDANCE, seed=0, output_type="latent", progress_bar=False, **kwargs).latents


def test_a_short_tiny_run_fuses_the_text_stream_only(tmp_path):
    cp, path = _setup(tmp_path)
    router = cp.routers["transformer"]
    with cp.run(["a"], PROMPT, "", GUIDANCE, 32, 32, None, STEPS) as run:
        paths = run.fuse_paths({"a": 1.0})
    assert "transformer_blocks.0.attn.add_q_proj" in paths and "transformer_blocks.0.ff_context.net.2" in paths
    assert "transformer_blocks.0.attn.to_q" not in paths and "transformer_blocks.0.norm1.linear" not in paths
    assert "single_transformer_blocks.0.proj_mlp" in paths  # joint: the text tokens and the image tokens
    base = {p: layer.module.weight.detach().clone() for p, layer in router.layers.items()}
    seen = {}

    def look(_pipe, step, _t, state):
        if step == 0:
            seen.update({p: not torch.equal(layer.module.weight, base[p]) for p, layer in router.layers.items()})
        return state

    fused = _run(cp, True, look)
    assert {p for p, changed in seen.items() if changed} == set(paths)  # exactly the chosen layers were fused
    assert all(torch.equal(layer.module.weight, base[p]) for p, layer in router.layers.items())  # restored bit-exactly
    routed = _run(cp, False)
    assert (fused - routed).abs().max() <= TOL
    ref_pipe = build_tiny_flux(0)
    ref_pipe.load_lora_weights(str(path))
    assert (fused - diffusers_latents(ref_pipe, PROMPT, STEPS, GUIDANCE)).abs().max() <= TOL


def test_partly_fused_weights_are_kept_and_reused_in_a_batch(tmp_path):
    cp, _ = _setup(tmp_path)
    router = cp.routers["transformer"]
    first_run = _run(cp, True)
    with cp.keep_fused():
        first = _run(cp, True)
        kept = router._kept
        assert router.kept_fused and kept[0][2] is not None  # the key names the fused layers
        second = _run(cp, True)
        assert router._kept[1] is kept[1]  # the same fused tensors: not fused again
    assert not router.kept_fused
    assert torch.equal(first, second) and (first - first_run).abs().max() <= TOL
