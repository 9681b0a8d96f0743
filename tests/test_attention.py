"""Attention-map capture (CLoRA): which layers, which resolution, the maps themselves, routing and batching."""

from __future__ import annotations

import pytest
import torch

from loraloom.composition import Routing
from loraloom.composition.methods import Step
from loraloom.pipelines.attention import (
    capture_cross_attention,
    choose_map_depth,
    cross_attention_depths,
    map_size_at,
    token_positions,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(down, up, channels, **kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=kw.pop("layers", 1),
                                block_out_channels=channels, down_block_types=down, up_block_types=up,
                                cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8, **kw)


def test_sd15_layout_captures_five_layers_at_w_over_32():
    """SD 1.5's block layout: at 512² (latent 64) the maps are 16x16, from down_blocks.2 (x2) and up_blocks.1 (x3);
    the 8x8 mid block is left out, as in the reference."""
    unet = _unet(("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 (8, 8, 8, 8), layers=2)
    depth = choose_map_depth(unet, (64, 64))
    assert depth == 2 and map_size_at((64, 64), depth) == (16, 16)
    names = [n for n, _ in cross_attention_depths(unet)[depth]]
    assert len(names) == 5 and all(n.startswith(("down_blocks.2.", "up_blocks.1.")) for n in names)
    assert map_size_at((96, 64), choose_map_depth(unet, (96, 64))) == (24, 16)  # 512 wide, 768 high
    assert choose_map_depth(unet, (32, 32)) == 2  # 256²: 8x8, as the reference's ceil(256 / 32)
    assert choose_map_depth(unet, (64, 64), side=32) == 1
    with pytest.raises(ValueError, match="available"):
        choose_map_depth(unet, (64, 64), side=12)


def test_sdxl_layout_and_small_models():
    # SDXL: no attention at full resolution; 1024² (latent 128) -> 32x32 = down_blocks.2, mid, up_blocks.0
    xl = _unet(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), (8, 8, 8))
    d = choose_map_depth(xl, (128, 128))
    assert map_size_at((128, 128), d) == (32, 32)
    assert {n.split(".")[0] for n, _ in cross_attention_depths(xl)[d]} == {"down_blocks", "mid_block", "up_blocks"}
    # the toy world's layout (16x16 latents, three levels): a quarter would be 4x4; the floor of 8 picks 8x8
    toy = _unet(("CrossAttnDownBlock2D",) * 3, ("CrossAttnUpBlock2D",) * 3, (8, 8, 8))
    assert map_size_at((16, 16), choose_map_depth(toy, (16, 16))) == (8, 8)


@pytest.fixture
def run(tiny_sd, tmp_path):
    from loraloom.pipelines.tiny import write_random_lora

    for i, name in enumerate(("a", "b")):
        tiny_sd.load_lora(write_random_lora(tiny_sd.pipe, tmp_path / f"{name}.safetensors", seed=i + 1, std=0.3), name)
    return tiny_sd.run(["a", "b"], "a red star", "", 5.0, 64, 64, scheduler="ddim", num_inference_steps=4)


def _hand_maps(unet, layers, x, t, hidden, tokens):
    """Reference maps: softmax(q k^T * scale) recomputed from each captured layer's inputs, mean over layers x heads."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out: seen.append((mod, args[0], kwargs["encoder_hidden_states"])),
                                     with_kwargs=True) for _, m in layers]
    try:
        out = unet(x, t, encoder_hidden_states=hidden).sample
    finally:
        for h in hooks:
            h.remove()
    total = 0
    for mod, h_in, ctx in seen:
        q = mod.to_q(h_in)
        k = mod.to_k(ctx)
        b, n, _ = q.shape
        q = q.view(b, n, mod.heads, -1).transpose(1, 2)
        k = k.view(b, ctx.shape[1], mod.heads, -1).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * mod.scale).softmax(-1)  # (b, heads, Q, S)
        total = total + torch.stack([probs[r][..., tokens[r]].sum(0) for r in range(b)])
    return out, total / (len(seen) * seen[0][0].heads)


def test_maps_match_a_hand_computation_and_output_is_unchanged(run):
    unet = run.pipeline.pipe.unet
    neg, pos = run.encode([{}])[0]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = run.scheduler.timesteps[1]
    hidden = torch.cat([neg.hidden, pos.hidden])
    tokens = torch.tensor([[1, 3, 5], [2, 4, -1]])
    layers = cross_attention_depths(unet)[choose_map_depth(unet, (16, 16))]
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=hidden).sample
        with capture_cross_attention(unet, tokens, (16, 16)) as store:
            captured = unet(x, t, encoder_hidden_states=hidden).sample
        ref_out, ref = _hand_maps(unet, layers, x, t, hidden, [[1, 3, 5], [2, 4, 4]])
    maps = store.maps()
    assert maps.shape == (2, 8, 8, 3)  # tiny model: cross-attention only one level down (16x16 latents -> 8x8)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-4)  # explicit softmax == SDPA
    torch.testing.assert_close(maps[0], ref[0].reshape(8, 8, 3), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[1, ..., :2], ref[1, :, :2].reshape(8, 8, 2), atol=1e-6, rtol=1e-5)
    assert maps[1, ..., 2].abs().max() == 0  # -1 = nothing kept
    # every processor is back to SDPA afterwards
    assert {type(m.processor).__name__ for _, m in layers} == {"AttnProcessor2_0"}


def test_maps_follow_routing_row_by_row_and_early_stop(run):
    """Batched branches: a row's maps equal those of a one-row call with that row's LoRA; stopping early changes
    nothing in the maps."""
    neg, pos = run.encode([{}])[0]
    from loraloom.composition.conditioning import Conditioning

    cond = Conditioning.cat([pos, pos, pos])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)).repeat(3, 1, 1, 1)
    step = Step(1, 4, run.scheduler.timesteps[1])
    tokens = torch.tensor([[1, 2]] * 3)
    routing = Routing.from_blocks([(1, {}), (1, {"a": 1.0}), (1, {"b": 1.0})])
    with torch.no_grad():
        eps, maps = run.predict_with_attention(x, step, cond, routing, tokens)
        none, early = run.predict_with_attention(x, step, cond, routing, tokens, output=False)
        singles = [run.predict_with_attention(x[:1], step, pos, Routing.uniform(g), tokens[:1])[1]
                   for g in ({}, {"a": 1.0}, {"b": 1.0})]
    assert none is None and eps.shape == (3, 4, 16, 16)
    torch.testing.assert_close(early, maps)
    for r in range(3):
        torch.testing.assert_close(maps[r], singles[r][0], atol=1e-6, rtol=1e-5)
    assert (maps[1] - maps[0]).abs().max() > 1e-4  # the LoRA changes where the tokens attend


def test_maps_are_differentiable_in_the_latents_only(run):
    neg, pos = run.encode([{}])[0]
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    step = Step(0, 4, run.scheduler.timesteps[0])
    unet = run.pipeline.pipe.unet
    with torch.enable_grad():
        _, maps = run.predict_with_attention(z, step, pos, Routing.uniform({"a": 1.0}), torch.tensor([[1, 2]]), output=False)
        assert maps.requires_grad
        (g,) = torch.autograd.grad(maps[..., 0].max(), z)
    assert g.abs().sum() > 0
    assert all(p.requires_grad for p in unet.parameters())  # the UNet's flags are restored
    assert all(p.grad is None for p in unet.parameters())


def test_token_positions(tiny_sd):
    tok = tiny_sd.pipe.tokenizer  # byte-level: one token per character, BOS at 0
    assert token_positions(tok, "a dog", ["dog", "a", "cat"]) == [[2, 3, 4], [1], []]
    assert token_positions(tok, "ab ab", ["ab"]) == [[1, 2, 3, 4]]
    long = "x " * 100 + "dog"
    assert token_positions(tok, long, ["dog"]) == [[]]  # cut off by the text encoder's 77 tokens

