"""Masked LoRAs on FLUX.1 and SD 3/3.5 (tiny pipelines built from config): the spatial gate on the image tokens (the
packed/patchified grid, non-square sizes included), the text tokens (the mask's smallest value: 0 for a mask with an
outside, 1 for a full one), the single-stream layers over [text; image], whole generations, schedules, the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dit_references import FLUX_TARGETS, SD3_TARGETS, write_peft_lora

from loraloom.composition import Routing
from loraloom.composition.errors import GenerationError
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny_dit import build_tiny_flux, build_tiny_sd3

H, W = 32, 48  # non-square: latent 16x24 (both tiny VAEs are 2x); FLUX's packed grid 8x12, SD3's (patch 1) 16x24
BUILD = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
TARGETS = {"flux": FLUX_TARGETS, "sd3": SD3_TARGETS}
GUIDANCE = {"flux": 3.5, "sd3": 5.0}


@pytest.fixture(scope="module", params=["flux", "sd3"])
def cp(request, tmp_path_factory):
    torch.set_num_threads(1)
    family = request.param
    pipe = BUILD[family](0)
    folder = tmp_path_factory.mktemp(f"{family}-masks")
    cp = ComposedPipeline(pipe)
    # "a": transformer and CLIP text-encoder layers; "b": transformer layers only
    cp.load_lora(write_peft_lora(pipe, folder, "a", seed=3, targets=TARGETS[family], std=0.3))
    cp.load_lora(write_peft_lora(pipe, folder, "b", seed=4, targets=TARGETS[family], text_encoder=False, std=0.3))
    return cp


def generate(cp, loras, method="merge", steps=2, **kwargs):
    return cp("a red cat, ink wash", loras=list(loras), method=method, method_params={"lora_scale": 1.0, "fuse": False}
              if method == "merge" else {}, num_inference_steps=steps, height=H, width=W,
              guidance_scale=GUIDANCE[cp.family], seed=0, output_type="latent", progress_bar=False, **kwargs).latents


def test_streams_and_grid_come_from_the_family(cp):
    """Each routed layer knows its tokens; the gate's image grid is the model's own token order: FLUX packs 2x2 latent
    patches row by row (`_pack_latents`), so a mask packed the same way and averaged over its patch is the gate."""
    streams = {p: layer.stream for p, layer in cp.routers["transformer"].layers.items()}
    assert streams["transformer_blocks.0.attn.to_q"] == "image" and streams["transformer_blocks.0.ff.net.2"] == "image"
    assert streams["transformer_blocks.0.attn.add_k_proj"] == "text" and streams["transformer_blocks.0.attn.to_add_out"] == "text"
    if cp.family == "flux":
        assert streams["single_transformer_blocks.0.proj_mlp"] == "joint" and streams["transformer_blocks.0.norm1.linear"] is None
    assert all(layer.stream is None for r in ("text_encoder",) for layer in cp.routers[r].layers.values())
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(H // 2, W // 2, generator=g)
    with cp.run(loras=[{"name": "b", "mask": mask}], height=H, width=W) as run:
        gate = run.token_gates["b"]
        if cp.family == "flux":
            from diffusers import FluxPipeline

            assert gate.grid == (H // 4, W // 4)
            packed = FluxPipeline._pack_latents(mask.expand(1, 4, *mask.shape), 1, 4, *mask.shape)  # (1, n, 4 * 2 * 2)
            want = packed.mean(-1, keepdim=True)
        else:
            assert gate.grid == (H // 2, W // 2)  # patch size 1
            want = mask.reshape(1, -1, 1)
        n = gate.grid[0] * gate.grid[1]
        torch.testing.assert_close(gate.on(torch.zeros(1, n, 4), False, "image"), want, atol=1e-6, rtol=0)
        assert gate.text == pytest.approx(float(want.min()))


def test_per_layer_outside_the_mask_base_inside_the_lora(cp):
    """Layers called on the same input without the LoRA, with it, and with it masked to the left half: on image tokens
    outside the mask exactly the base output, inside the LoRA's; on text tokens (the mask has an outside) the base output;
    a single-stream layer (FLUX) over [text; image] both at once."""
    router = cp.routers["transformer"]
    mods = dict(cp.arch.pipe.transformer.named_modules())
    h, w = cp.arch.attention_grid((H // 2, W // 2))
    text = 7
    image_layers = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.0.proj"]
    text_layers = ["transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out"]
    joint_layers = ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"] if cp.family == "flux" else []
    g = torch.Generator().manual_seed(0)
    inputs = {p: torch.randn(2, h * w, mods[p].in_features, generator=g) for p in image_layers}
    inputs.update({p: torch.randn(2, text, mods[p].in_features, generator=g) for p in text_layers})
    inputs.update({p: torch.randn(2, text + h * w, mods[p].in_features, generator=g) for p in joint_layers})

    def outputs(routing):
        router.set_routing(routing)
        with torch.no_grad():
            return {p: mods[p](x) for p, x in inputs.items()}

    with cp.run(loras=[{"name": "b", "mask": "left"}], height=H, width=W):
        masked = outputs(Routing.uniform({"b": 1.0}))
        router.set_controls()
        full = outputs(Routing.uniform({"b": 1.0}))
        base = outputs(None)
    for p in image_layers + joint_layers:
        m, b, f = (o[p][:, -h * w:].reshape(2, h, w, -1) for o in (masked, base, full))
        assert (f - b).abs().max() > 1e-3, p  # the LoRA does something there
        assert torch.equal(m[:, :, w // 2:], b[:, :, w // 2:]), p
        torch.testing.assert_close(m[:, :, :w // 2], f[:, :, :w // 2], atol=1e-6, rtol=0)
    for p in text_layers:
        assert (full[p] - base[p]).abs().max() > 1e-3 and torch.equal(masked[p], base[p]), p
    for p in joint_layers:
        assert torch.equal(masked[p][:, :text], base[p][:, :text]), p


@pytest.mark.parametrize("method", ["merge", "composite"])
def test_generation_full_mask_is_the_lora_empty_mask_no_lora(cp, method):
    """A whole generation (non-square) with mask 'full' equals the unmasked LoRAs (its text-encoder part included),
    with an all-zero mask no LoRA at all; a half mask is neither."""
    base = generate(cp, [])  # no LoRA (Merge of none; Composite needs a LoRA)
    plain = generate(cp, ["a", "b"], method)
    assert (plain - base).abs().max() > 1e-3
    full = generate(cp, [{"name": "a", "mask": "full"}, {"name": "b", "mask": "full"}], method)
    # 1e-6 relative to the latents' size: unmasked, Composite's branches run as one batched matmul (`RoutedLayer.grouped`),
    # gated ones each on their rows, which rounds differently (Merge: both unfused, 5e-7 here)
    assert (full - plain).abs().max() <= 1e-6 * max(1.0, float(plain.abs().max()))
    assert (generate(cp, [{"name": "a", "mask": torch.zeros(4, 4)}], method) - base).abs().max() <= 1e-6
    zero = generate(cp, [{"name": "a", "mask": torch.zeros(4, 4)}, "b"], method)
    if method == "merge":  # (Composite's branch of "a" is then the base prediction, averaged in: not Composite of "b")
        # next to "b", the two LoRAs run as one stacked term (`Stacked`): a's zero gate adds nothing but float rounding
        assert (zero - generate(cp, ["b"], method)).abs().max() <= 2e-5
    left = generate(cp, [{"name": "a", "mask": "left"}, "b"], method)
    assert (left - plain).abs().max() > 1e-4 and (left - zero).abs().max() > 1e-4


def test_no_mask_builds_no_gate(cp, monkeypatch):
    """Without masks nothing changes: no gate object is built and no layer has a gated term."""
    from loraloom.composition import routing

    def refuse(*args, **kwargs):
        raise AssertionError("a SpatialGate was built for a run without masks")

    monkeypatch.setattr(routing.SpatialGate, "__init__", refuse)
    seen = []
    predict = cp.arch.predict

    def spy(*args, **kwargs):
        seen.append([t[4] for layer in cp.routers["transformer"].layers.values() for t in layer.active])
        return predict(*args, **kwargs)

    monkeypatch.setattr(cp.arch, "predict", spy)
    generate(cp, ["a", "b"], steps=1)
    assert seen and all(g is None for call in seen for g in call)


def test_schedules_act_on_their_steps(cp, monkeypatch):
    """`start`/`stop` on a transformer: the LoRA is routed on its steps only; a window over the whole run changes nothing."""
    whole = generate(cp, [{"name": "b", "start": 0, "stop": 2}])
    assert torch.equal(whole, generate(cp, ["b"]))
    routings = []
    predict = cp.arch.predict

    def spy(*args, **kwargs):
        routings.append({n for blk in cp.routers["transformer"].routing.blocks for n, g in blk.gates if g})
        return predict(*args, **kwargs)

    monkeypatch.setattr(cp.arch, "predict", spy)
    first = generate(cp, [{"name": "b", "stop": 0.5}])  # half the run: step 0
    assert routings == [{"b"}, set()]
    assert (first - whole).abs().max() > 1e-4 and (first - generate(cp, [])).abs().max() > 1e-4


def test_base_weight_without_regions_and_block_weights_are_refused(cp):
    # regions themselves run on these models: tests/test_dit_regions.py
    with pytest.raises(GenerationError, match="base_weight.*needs regions.*Fix: leave out base_weight"):
        generate(cp, [{"name": "b", "mask": "left"}], base_weight=0.3)
    with pytest.raises(GenerationError, match=r"block weights OUTD: a preset of the SD UNet's blocks .*Fix: .*ALL, NONE, "
                                              r"ALL0.5"):  # the UNet presets; the transformers' blocks work (test_dit_block_weights)
        generate(cp, [{"name": "b", "lbw": "OUTD"}])
    with pytest.raises(GenerationError, match="has no meaning for regions or masked LoRAs"):
        generate(cp, [{"name": "b", "mask": "left"}], method="klora")


def test_padded_text_positions_and_wrong_size_are_told(cp):
    """A gate built for one size refuses another size's tokens, saying so."""
    from loraloom.composition.routing import SpatialGate

    gate = SpatialGate(torch.ones(16, 24), grid=(8, 12), text=0.0)
    with pytest.raises(ValueError, match="image token grid is 8x12 = 96.*another image size"):
        gate.on(torch.zeros(1, 100, 4), False, "image")
    assert F.relu(gate.on(torch.zeros(1, 100, 4), False, "joint")[0, :4, 0]).sum() == 0  # 4 text tokens, gate 0
