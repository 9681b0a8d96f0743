"""Per-LoRA controls in the routing layer: spatial gates, schedules, block weights, TE/UNet strengths, regions."""

from __future__ import annotations

import re

import pytest
import torch

from loraloom.composition import Routing
from loraloom.composition.controls import (
    BLOCKID12,
    BLOCKID17,
    BLOCKID20,
    BLOCKID26,
    LBW_PRESETS,
    ControlError,
    Region,
    Schedule,
    block_of,
    block_vector,
    use_from,
)
from loraloom.composition.errors import GenerationError
from loraloom.composition.routing import SpatialGate
from loraloom.composition.spatial import box_mask, mask_from, region_weights, token_grid
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny import build_tiny_sd, build_tiny_sdxl, write_random_lora

KW = dict(num_inference_steps=4, seed=0, scheduler="ddim", output_type="latent", progress_bar=False, guidance_scale=5.0)
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture
def two(tmp_path, tiny_sd):
    for i, n in enumerate(("a", "b")):
        tiny_sd.load_lora(write_random_lora(tiny_sd.pipe, tmp_path / f"{n}.safetensors", seed=i + 1, std=0.3,
                                            targets=(*ATTN, "conv1", "proj_in")), n)
    return tiny_sd


def _outputs(unet, names, run):
    """Outputs of the named modules during one UNet call."""
    seen = {}
    mods = dict(unet.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out.detach().clone())) for n in names]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


# --- spatial gates -------------------------------------------------------------------------------------------
def test_outside_the_mask_the_layer_output_is_the_base_output_inside_the_lora_output(two, one_thread):
    """Each kind of routed layer, called on the same input without the LoRA, with it, and with it masked to the
    left half of a 16x16 latent: outside the mask exactly the base output, inside the LoRA's."""
    router = two.routers["unet"]
    conv = next(p for p in router.layers if p.endswith("conv1") and "a" in router.layers[p].factors)
    attn = next(p for p in router.layers if p.endswith("attn1.to_q") and "a" in router.layers[p].factors)
    kv = next(p for p in router.layers if p.endswith("attn2.to_k") and "a" in router.layers[p].factors)
    mods = {p: router.layers[p].module for p in (conv, attn, kv)}
    g = torch.Generator().manual_seed(0)
    inputs = {conv: torch.randn(2, mods[conv].in_channels, 8, 8, generator=g),  # a feature map at half the latent's size
              attn: torch.randn(2, 8 * 8, mods[attn].in_features, generator=g),  # its 8x8 token grid
              kv: torch.randn(2, 154, mods[kv].in_features, generator=g)}  # two prompts side by side
    mask = box_mask((0.0, 0.0, 0.5, 1.0), 16, 16)

    def outputs(routing, gates):
        router.set_controls(gates=gates)
        router.set_routing(routing)
        with torch.no_grad():
            return {p: mods[p](x) for p, x in inputs.items()}

    base = outputs(None, None)
    full = outputs(Routing.uniform({"a": 1.0}), None)
    masked = outputs(Routing.uniform({"a": 1.0}), {"a": SpatialGate(mask, [slice(77, 154)])})
    router.set_controls()
    router.set_routing(None)
    b, f, m = base[conv], full[conv], masked[conv]
    assert torch.equal(m[..., 4:], b[..., 4:]) and torch.allclose(m[..., :4], f[..., :4], atol=1e-6) and (f - b).abs().max() > 1e-3
    ma, ba, fa = (o[attn].reshape(2, 8, 8, -1) for o in (masked, base, full))
    assert torch.equal(ma[:, :, 4:], ba[:, :, 4:]) and torch.allclose(ma[:, :, :4], fa[:, :, :4], atol=1e-6)
    assert torch.equal(masked[kv][:, :77], base[kv][:, :77]) and torch.allclose(masked[kv][:, 77:], full[kv][:, 77:], atol=1e-6)


def test_regional_cross_attention_outside_a_region_is_the_base_prompts_attention(tiny_sd, one_thread):
    """One cross-attention layer over [base prompt | region prompt]: outside the region's mask the output equals
    plain attention to the base prompt, inside it plain attention to the region's prompt."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from loraloom.pipelines.regions import RegionalCrossAttention

    attn = next(m for n, m in tiny_sd.pipe.unet.named_modules() if n.endswith("attn2"))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 8 * 8, attn.to_q.in_features, generator=g)
    base_ctx, region_ctx = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    mask = box_mask((0.0, 0.0, 0.5, 1.0), 16, 16)
    weights = [1 - mask, mask]
    with torch.no_grad():
        regional = RegionalCrossAttention([slice(0, 77), slice(77, 154)], weights)(attn, hidden, torch.cat([base_ctx, region_ctx], 1))
        plain = AttnProcessor2_0()
        on_base, on_region = plain(attn, hidden, base_ctx), plain(attn, hidden, region_ctx)
    r, b, i = (x.reshape(8, 8, -1) for x in (regional, on_base, on_region))
    torch.testing.assert_close(r[:, 4:], b[:, 4:], atol=1e-6, rtol=0)
    torch.testing.assert_close(r[:, :4], i[:, :4], atol=1e-6, rtol=0)


def test_no_gate_costs_no_separate_delta(two, monkeypatch, one_thread):
    """Without masks the fused in-place path runs (no delta tensor is formed per adapter)."""
    router = two.routers["unet"]
    router.set_routing(Routing.uniform({"a": 1.0}))
    layer = next(r for r in router.layers.values() if not r.is_conv)
    calls = []
    monkeypatch.setattr(type(layer), "low_rank", lambda self, *a: calls.append(1) or pytest.fail("delta formed"))
    x = torch.randn(1, 5, layer.module.in_features)
    with torch.no_grad():
        layer(x)
    assert not calls
    router.set_routing(None)


def test_masks_resize_to_each_grid(one_thread):
    m = mask_from("left", 64, 64)
    assert m[:, :32].min() == 1 and m[:, 32:].max() == 0
    assert token_grid(16 * 16, (64, 64)) == (16, 16) and token_grid(8 * 8, (64, 64)) == (8, 8)
    soft = mask_from([0.25, 0.25, 0.75, 0.75], 40, 40, feather=0.1)
    assert 0 < float(soft[10, 20]) < 1 and float(soft[20, 20]) == 1.0 and float(soft[0, 0]) == 0.0
    base, parts = region_weights([mask_from("left", 8, 8), mask_from("full", 8, 8)])
    assert torch.allclose(base + sum(parts), torch.ones(8, 8))
    with pytest.raises(ValueError, match="unknown region"):
        mask_from("upper-left-ish", 8, 8)
    with pytest.raises(ValueError, match="between 0 and 1"):
        mask_from(torch.full((4, 4), 2.0), 8, 8)


# --- regions through whole generations ---------------------------------------------------------------------------
def test_a_full_image_region_equals_the_plain_generation(two, one_thread):
    plain = two("a red star", loras=["a"], method="merge", method_params={"fuse": False, "lora_scale": 1.0}, **KW).latents
    full = two("unused", loras=["a"], method="merge", method_params={"lora_scale": 1.0},
               regions=[Region("full", prompt="a red star", loras=("a",))], **KW).latents
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=0)


def test_regions_in_merge_switch_and_composite_and_refused_elsewhere(two, one_thread):
    loras = [{"name": "a", "mask": "left"}, {"name": "b", "mask": "right"}]
    base = two("a red star", loras=[], method="merge", **KW).latents
    for method in ("merge", "switch", "composite"):
        out = two("a red star", loras=loras, method=method, **KW).latents
        assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3, method
    for method in ("klora", "clora", "cmlora"):
        with pytest.raises(GenerationError, match="no meaning for regions"):
            two("a red star", loras=loras, method=method, **KW)
    with pytest.raises(GenerationError, match="merges the LoRAs into one"):
        two("a red star", loras=[{"name": "a", "start": 0.5}, "b"], method="ziplora", method_params={"steps": 0}, **KW)
    # nothing stays behind in the routers or the attention processors after a regional run
    assert all(not r.gates and not r.scales for r in two.routers.values())
    procs = {type(p).__name__ for p in two.pipe.unet.attn_processors.values()}
    assert "RegionalCrossAttention" not in procs


# --- schedules -----------------------------------------------------------------------------------------------
def test_schedule_factors(one_thread):
    s = Schedule(0.25, 0.75)
    assert [s.factor(i, 8) for i in range(8)] == [0, 0, 1, 1, 1, 1, 0, 0]
    steps = Schedule(2, 5)  # step numbers, as the LBW extension's start=/stop=
    assert [steps.factor(i, 8) for i in range(8)] == [0, 0, 1, 1, 1, 0, 0, 0]
    ramp = Schedule(0.0, None, ((0.0, 0.0), (0.5, 1.0)))
    assert [round(ramp.factor(i, 4), 3) for i in range(4)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ControlError):
        Schedule(0.5, 0.5)


def test_schedule_equals_diffusers_with_set_adapters_switched_by_a_step_callback(tmp_path, one_thread):
    reference = build_tiny_sd()
    reference.set_progress_bar_config(disable=True)
    path = write_random_lora(reference, tmp_path / "s.safetensors", seed=3, std=0.3)
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="s")
    reference.set_adapters(["s"], [1.0])

    def switch(pipe, i, t, kwargs):  # on at steps 1 and 2 of 0..3
        pipe.set_adapters(["s"], [{"unet": 1.0 if i + 1 in (1, 2) else 0.0, "text_encoder": 1.0}])
        return kwargs

    reference.set_adapters(["s"], [{"unet": 0.0, "text_encoder": 1.0}])
    g = torch.Generator("cpu").manual_seed(0)
    expected = reference("a red star", num_inference_steps=4, guidance_scale=5.0, generator=g, output_type="latent",
                         callback_on_step_end=switch).images
    ours = ComposedPipeline(build_tiny_sd())
    ours.load_lora(path, "s")
    got = ours("a red star", loras=[{"name": "s", "start": 1, "stop": 3}], method="merge", method_params={"lora_scale": 1.0},
               **{**KW, "scheduler": "default"}).latents
    assert (expected - got).abs().max() < 1e-4
    always = ours("a red star", loras=["s"], method="merge", method_params={"lora_scale": 1.0}, **{**KW, "scheduler": "default"}).latents
    assert (always - got).abs().max() > 1e-3


# --- block weights and strengths -------------------------------------------------------------------------------
def test_block_vectors_and_presets_as_the_extension_defines_them(one_thread):
    assert len(BLOCKID26) == 26 and len(BLOCKID17) == 17 and len(BLOCKID12) == 12 and len(BLOCKID20) == 20
    all17 = block_vector("ALL")
    assert all(all17[b] == 1.0 for b in BLOCKID17) and all17["IN00"] == 0.0  # blocks a 17-list leaves out weigh 0
    assert block_vector("outd")["OUT03"] == 1.0 and block_vector("OUTD")["OUT07"] == 0.0
    assert set(LBW_PRESETS) >= {"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"}
    with pytest.raises(ControlError, match="12, 17, 20 or 26"):
        block_vector("1,1,1")
    with pytest.raises(ControlError, match="not a preset"):
        block_vector("SOMETIMES")


@pytest.mark.parametrize("builder,blocks", [(build_tiny_sd, 2), (build_tiny_sdxl, 2)], ids=["sd1", "sdxl"])
def test_block_ids_agree_with_the_original_unet_numbering(builder, blocks, one_thread):
    """kohya/A1111 SGM key names carry the original UNet's block numbers; diffusers' converter maps them to module
    paths, and `block_of` must give each path back the block its key named."""
    from loraloom.composition.lora_formats import KohyaLayout

    pipe = builder()
    checked = 0
    for path, mod in pipe.unet.named_modules():
        if not path.endswith((".attn1.to_q", ".conv1")) or not hasattr(mod, "weight"):
            continue
        ours = block_of("unet", path, blocks)
        sgm = _sgm_key(path, blocks)
        if sgm is None:
            continue
        down = torch.zeros(2, *mod.weight.shape[1:2], *mod.weight.shape[2:]) if mod.weight.ndim == 4 else torch.zeros(2, mod.weight.shape[1])
        up = torch.zeros(mod.weight.shape[0], 2, *([1, 1] if mod.weight.ndim == 4 else []))
        layers = KohyaLayout.convert({f"{sgm}.lora_down.weight": down, f"{sgm}.lora_up.weight": up}, {}, None,
                                     unet_config=pipe.unet.config)
        (converted,) = layers["unet"]
        assert converted == path, (sgm, converted, path)
        m = re.match(r"lora_unet_(input|output)_blocks_(\d+)_", sgm)
        want = f"{'IN' if m.group(1) == 'input' else 'OUT'}{int(m.group(2)):02d}" if m else "M00"
        assert ours == want, (path, ours, want)
        checked += 1
    assert checked >= 8


def _sgm_key(path: str, lpb: int) -> str | None:
    """kohya's SGM name of a diffusers UNet path (the original UNet's input/middle/output block numbers)."""
    sub = {"conv1": "in_layers_2", "conv2": "out_layers_3"}
    m = re.match(r"(down|up)_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)", path)
    if m:
        kind, b, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        idx = 1 + b * (lpb + 1) + j if kind == "down" else b * (lpb + 1) + j
        inner = "1" if part == "attentions" else "0"
        rest = sub.get(rest, rest)
        return f"lora_unet_{'input' if kind == 'down' else 'output'}_blocks_{idx}_{inner}_{rest.replace('.', '_')}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", path)
    if m:
        return f"lora_unet_middle_block_1_{m.group(1).replace('.', '_')}"
    return None


def test_block_weights_in_a_generation(two, one_thread):
    none_ = two("a red star", loras=[{"name": "a", "lbw": "NONE"}], method="merge", **KW).latents
    base = two("a red star", loras=[], method="merge", **KW).latents
    torch.testing.assert_close(none_, base, atol=1e-6, rtol=0)  # BASE 0 and every block 0: no LoRA at all
    all26 = two("a red star", loras=[{"name": "a", "lbw": ",".join(["1"] * 26)}], method="merge", **KW).latents
    plain = two("a red star", loras=["a"], method="merge", **KW).latents
    torch.testing.assert_close(all26, plain, atol=1e-6, rtol=0)
    fused = two("a red star", loras=[{"name": "a", "lbw": "OUTALL"}], method="merge", **KW).latents
    unfused = two("a red star", loras=[{"name": "a", "lbw": "OUTALL"}], method="merge", method_params={"fuse": False}, **KW).latents
    assert (fused - unfused).abs().max() < 1e-4 and (fused - plain).abs().max() > 1e-3


def test_block_weights_equal_diffusers_unet_block_scales(tmp_path, one_thread):
    """SD 1.x tiny: LBW weights on the attention blocks equal diffusers' `set_adapters` block scales."""
    reference = build_tiny_sd()
    reference.set_progress_bar_config(disable=True)
    path = write_random_lora(reference, tmp_path / "bw.safetensors", seed=5, std=0.3, text_encoder=False)
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="bw")
    # tiny SD 1.x: down_blocks.1 attentions = IN04, IN05; mid = M00; up_blocks.0 attentions = OUT00..OUT02
    reference.set_adapters(["bw"], [{"unet": {"down": {"block_1": [0.25, 0.5]}, "mid": 0.75, "up": {"block_0": [1.0, 0.0, 0.5]}}}])
    g = torch.Generator("cpu").manual_seed(0)
    expected = reference("a red star", num_inference_steps=4, guidance_scale=5.0, generator=g, output_type="latent").images
    weights = dict.fromkeys(BLOCKID26, 1.0)
    weights.update({"IN04": 0.25, "IN05": 0.5, "M00": 0.75, "OUT00": 1.0, "OUT01": 0.0, "OUT02": 0.5})
    ours = ComposedPipeline(build_tiny_sd())
    ours.load_lora(path, "bw")
    got = ours("a red star", loras=[{"name": "bw", "lbw": [weights[b] for b in BLOCKID26]}], method="merge",
               method_params={"lora_scale": 1.0}, **{**KW, "scheduler": "default"}).latents
    assert (expected - got).abs().max() < 1e-4


def test_text_encoder_and_unet_strengths_equal_diffusers_per_component_set_adapters(tmp_path, one_thread):
    reference = build_tiny_sd()
    reference.set_progress_bar_config(disable=True)
    path = write_random_lora(reference, tmp_path / "tu.safetensors", seed=6, std=0.3)
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="tu")
    reference.set_adapters(["tu"], [{"unet": 0.4, "text_encoder": 1.5}])
    g = torch.Generator("cpu").manual_seed(0)
    expected = reference("a red star", num_inference_steps=4, guidance_scale=5.0, generator=g, output_type="latent").images
    ours = ComposedPipeline(build_tiny_sd())
    ours.load_lora(path, "tu")
    for fuse in (False, True):
        got = ours("a red star", loras=[{"name": "tu", "te": 1.5, "unet": 0.4}], method="merge",
                   method_params={"lora_scale": 1.0, "fuse": fuse}, **{**KW, "scheduler": "default"}).latents
        assert (expected - got).abs().max() < 1e-4, fuse


def test_lora_entries_are_checked(one_thread):
    name, weight, c = use_from({"name": "x", "weight": 0.5, "te": 0.2, "lbw": "OUTD", "start": 0.1, "stop": 0.9, "mask": "left"})
    assert (name, weight, c.te, c.blocks, c.mask) == ("x", 0.5, 0.2, "OUTD", "left") and c.schedule.start == 0.1
    with pytest.raises(ControlError, match="unknown key"):
        use_from({"name": "x", "strength": 2})
    with pytest.raises(ControlError, match="not a preset"):
        use_from({"name": "x", "lbw": "MOSTLY"})


def test_masks_set_during_a_run_gate_the_unet_and_are_lifted_after(two, one_thread):
    """`Run.set_masks` (for token-routed methods): all-ones = the LoRA everywhere; all-zeros = the LoRA only where no
    image position exists, the cross-attention keys/values of the prompt; the gates are gone after the run."""
    from loraloom.composition.methods import Step
    from loraloom.composition.methods.base import cfg_pair

    router = two.routers["unet"]
    image_side = {p: {"a": 0.0} for p, layer in router.layers.items() if not layer.reads_text}

    def one_step(mask_value, layer_gates=None):
        with two.run(["a"], "a red star", "", 5.0, 64, 64, scheduler="ddim", num_inference_steps=2) as run:
            cond = cfg_pair(run.encode([{}])[0])  # the text encoder without the LoRA: only the UNet differs
            if mask_value is not None:
                run.set_masks({"a": torch.full((32, 32), mask_value)})
            x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
            return run.predict(x, Step(0, 2, run.scheduler.timesteps[0]), cond, Routing.uniform({"a": 1.0}), layer_gates)

    with torch.no_grad():
        plain, ones, zeros = one_step(None), one_step(1.0), one_step(0.0)
        kv_only = one_step(None, image_side)
    torch.testing.assert_close(ones, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(zeros, kv_only, atol=1e-6, rtol=0)
    assert (plain - zeros).abs().max() > 1e-3
    assert not router.gates


def test_only_cross_attention_blocks_are_text_side_and_get_regions(one_thread):
    """The toy model's first and last blocks are diffusers `only_cross_attention`: their attn1 attends to the prompt.
    Its keys/values read the text (masked LoRAs gate them by prompt span, not as an image grid), and the regional
    processor sits on it too; a masked LoRA there runs."""
    from loraloom.evaluation.toyworld import LORAS_DIR, MODEL
    from loraloom.pipelines.regions import cross_attention_modules

    cp = ComposedPipeline.from_pretrained(str(MODEL))
    cp.load_lora(LORAS_DIR / "clothing_1.safetensors", "hat")
    unet = cp.pipe.unet
    attn1_cross = [n for n, m in unet.named_modules() if n.endswith("attn1") and m.is_cross_attention]
    assert attn1_cross
    router = cp.routers["unet"]
    for name in attn1_cross:
        for leaf in ("to_k", "to_v"):
            if f"{name}.{leaf}" in router.layers:
                assert router.layers[f"{name}.{leaf}"].reads_text
    assert {id(unet.get_submodule(n)) for n in attn1_cross} <= {id(m) for m in cross_attention_modules(unet)}
    out = cp("a red circle, topha, white background", loras=[{"name": "hat", "mask": [0, 0, 1, 0.5]}], method="merge",
             num_inference_steps=2, guidance_scale=2.0, seed=0, output_type="latent", progress_bar=False)
    assert torch.isfinite(out.latents).all()
