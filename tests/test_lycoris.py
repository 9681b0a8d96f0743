"""LyCORIS and PEFT adapter files made by the producers themselves, loaded through `load_lora`.

Every file here is written by lycoris-lora's own network code (`lycoris.kohya.create_network` on the tiny SD 1.x and
SDXL pipelines, `LycorisNetworkKohya.save_weights`: the kohya key names sd-scripts writes) or by PEFT + diffusers
(`LoraConfig(use_dora=True)`, `save_lora_weights`: DoRA magnitude vectors). For each algorithm:

- the file loads through loraloom's normal path and every module of it becomes an adapter (none dropped);
- per layer, `delta()` equals LyCORIS' functional result (`lycoris.functional.*` with the module's own scale and
  constraint, W' - W for the multiplicative types) within 1e-5 in float32;
- the routed UNet and text encoder equal LyCORIS' own forward of the same network (its training semantics);
- a generation with the file (Merge, fused and unfused) equals one of the base model with the reference ΔW merged into
  a copy of its weights, within 1e-4 on the latents, and the base weights are bit-identical afterwards.

lycoris-lora is in the `dev` extra (a test-only reference); the tests skip without it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import weights_hash

from loraloom.composition import Routing, load_lora, read_lora_info
from loraloom.pipelines import ComposedPipeline

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora (the dev extra) is the reference these tests compare with")
from lycoris import kohya  # noqa: E402
from lycoris.functional import boft as ly_boft  # noqa: E402
from lycoris.functional import diag_oft as ly_oft  # noqa: E402
from lycoris.functional import locon as ly_locon  # noqa: E402
from lycoris.functional import loha as ly_loha  # noqa: E402
from lycoris.functional import lokr as ly_lokr  # noqa: E402
from lycoris.functional.general import weight_decompose  # noqa: E402
from lycoris.modules import (  # noqa: E402
    ButterflyOFTModule,
    DiagOFTModule,
    FullModule,
    LoConModule,
    LohaModule,
    LokrModule,
    NormModule,
)

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

GEN = dict(num_inference_steps=2, seed=0, scheduler="ddim", output_type="latent", progress_bar=False, guidance_scale=5.0)
PROMPT, NEGATIVE = "a red star", "ugly"

# LyCORIS presets for the tiny diffusers models (its "full" preset lists diffusers' TimestepEmbedding both as a block
# and by the names of its layers, which LyCORIS 4.1 refuses as duplicates on a diffusers UNet).
UNET_BLOCKS = '''enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
'''
PRESETS = {
    # CLIPEncoderLayer: attention, MLP and (with train_norm) the layer norms of the text encoders
    "full": UNET_BLOCKS + 'text_encoder_target_module = ["CLIPEncoderLayer"]\ntext_encoder_target_name = []\n',
    # BOFT needs power-of-two blocks; the tiny text encoder's 37-wide MLP has none, so its attention only
    "attn-te": UNET_BLOCKS + 'text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention"]\ntext_encoder_target_name = []\n',
    # one file, three types: LoHa in the resnets, LoKr in the transformer blocks, LoCon elsewhere, plus norm diffs
    "mixed": UNET_BLOCKS + 'text_encoder_target_module = ["CLIPEncoderLayer"]\ntext_encoder_target_name = []\n'
             '[module_algo_map.ResnetBlock2D]\nalgo = "loha"\n[module_algo_map.Transformer2DModel]\nalgo = "lokr"\n',
}

# id: (algo, dim, alpha, LyCORIS arguments, preset, adapter types expected). alpha != dim so that scale != 1.
CONFIGS = {
    "locon": ("lora", 4, 2.0, {}, "full", {"LoRA"}),
    "locon-tucker": ("lora", 4, 2.0, {"use_tucker": True}, "full", {"LoRA", "LoCon-Tucker"}),
    "loha": ("loha", 4, 2.0, {}, "full", {"LoHa"}),
    "loha-tucker": ("loha", 4, 2.0, {"use_tucker": True}, "full", {"LoHa"}),
    "lokr": ("lokr", 2, 1.0, {}, "full", {"LoKr"}),  # full w1, factorised w2
    "lokr-factorised": ("lokr", 2, 1.0, {"decompose_both": True, "unbalanced_factorization": True}, "full", {"LoKr"}),
    "lokr-tucker": ("lokr", 1, 0.5, {"decompose_both": True, "unbalanced_factorization": True, "use_tucker": True}, "full", {"LoKr"}),
    "lokr-full": ("lokr", 4, 2.0, {"full_matrix": True}, "full", {"LoKr"}),
    "dora": ("lora", 4, 2.0, {"dora_wd": True}, "full", {"DoRA"}),  # kohya-format DoRA keys: lora_down/lora_up/dora_scale
    "dora-input": ("lora", 4, 2.0, {"dora_wd": True, "wd_on_output": False}, "full", {"DoRA"}),
    "loha-dora": ("loha", 4, 2.0, {"dora_wd": True}, "full", {"LoHa+DoRA"}),
    "lokr-dora": ("lokr", 2, 1.0, {"dora_wd": True}, "full", {"LoKr+DoRA"}),
    "oft": ("diag-oft", 4, 1.0, {"constraint": 1e-3}, "full", {"OFT"}),
    "oft-rescaled": ("diag-oft", 4, 1.0, {"rescaled": True}, "full", {"OFT"}),
    "boft": ("boft", 4, 1.0, {}, "attn-te", {"BOFT"}),
    "boft-rescaled": ("boft", 4, 1.0, {"rescaled": True}, "attn-te", {"BOFT"}),
    "full": ("full", 4, 1.0, {}, "full", {"full"}),
    "norm": ("lora", 4, 2.0, {"train_norm": True}, "full", {"LoRA", "norm"}),
    "mixed": ("lora", 4, 2.0, {"train_norm": True}, "mixed", {"LoRA", "LoHa", "LoKr", "norm"}),
}
STD = {"full": 0.02, "diag-oft": 0.05, "boft": 0.05}  # noise added to every trained parameter ("training")


# --- producing files ----------------------------------------------------------------------------------------------
def preset_file(folder: Path, name: str) -> str:
    path = folder / f"preset_{name}.toml"
    if not path.exists():
        path.write_text(PRESETS[name])
    return str(path)


def text_encoders(pipe):
    return [pipe.text_encoder, pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else pipe.text_encoder


def lycoris_network(cp, folder: Path, config: str, seed: int = 0, text_encoder: bool = True, name: str | None = None):
    """Train-free LyCORIS network of `config` on copies of cp's UNet and text encoders: LyCORIS' network creation,
    every trainable parameter moved by seeded noise (a stand-in for training), saved by LyCORIS' own save_weights.
    Returns (file, network, its UNet copy, its text-encoder copy or copies)."""
    algo, dim, alpha, kw, preset, _ = CONFIGS[config]
    unet = copy.deepcopy(cp.pipe.unet)
    tes = copy.deepcopy(text_encoders(cp.pipe))
    cls = kohya.LycorisNetworkKohya
    saved = {k: v for k, v in vars(cls).items() if k.isupper()}  # apply_preset sets class attributes for good
    try:
        net = kohya.create_network(1.0, dim, alpha, None, tes, unet, algo=algo, preset=preset_file(folder, preset), **kw)
    finally:
        for k, v in saved.items():
            setattr(cls, k, v)
    net.apply_to(tes, unet, text_encoder, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * STD.get(algo, 0.05))
    path = folder / f"{name or config}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo, **kw})})
    return path, net, unet, tes


def lycoris_names(pipe) -> dict[str, tuple[str, str]]:
    """{LyCORIS module name: (component, module path)} the way lycoris.kohya names a diffusers model's modules."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    comps = {"unet": ("lora_unet", pipe.unet), "text_encoder": ("lora_te1" if sdxl else "lora_te", pipe.text_encoder)}
    if sdxl:
        comps["text_encoder_2"] = ("lora_te2", pipe.text_encoder_2)
    return {f"{prefix}_{n.replace('.', '_')}": (c, n) for c, (prefix, model) in comps.items() for n, _ in model.named_modules() if n}


@torch.no_grad()
def lycoris_delta(m, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW, Δb) of one LyCORIS module by LyCORIS' functional modules, with the module's own scale (alpha / dim as the
    module computes it) and constraint; the base weight for the multiplicative types. LoHa and LoKr use the scale
    once, as their training forward does (`get_weight`)."""
    w = weight.float()
    if isinstance(m, LoConModule):
        d = ly_locon.diff_weight(m.lora_down.weight, m.lora_up.weight, m.lora_mid.weight if m.tucker else None, gamma=m.scale).reshape(m.shape)
    elif isinstance(m, LohaModule):
        t1, t2 = (m.hada_t1, m.hada_t2) if m.tucker else (None, None)
        d = ly_loha.diff_weight(m.hada_w1_b, m.hada_w1_a, m.hada_w2_b, m.hada_w2_a, t1, t2, gamma=m.scale).reshape(m.shape)
    elif isinstance(m, LokrModule):
        d = ly_lokr.kron_weight(m.lokr_w1 if m.use_w1 else None, None if m.use_w1 else m.lokr_w1_a, None if m.use_w1 else m.lokr_w1_b,
                                m.lokr_w2 if m.use_w2 else None, None if m.use_w2 else m.lokr_w2_a,
                                None if m.use_w2 else m.lokr_w2_b, m.lokr_t2 if (m.tucker and not m.use_w2) else None,
                                scale=m.scale).reshape(m.shape)
    elif isinstance(m, DiagOFTModule):
        return ly_oft.diff_weight(w, m.oft_blocks, m.rescale if m.rescaled else None, constraint=m.constraint), None
    elif isinstance(m, ButterflyOFTModule):
        return ly_boft.diff_weight(w, m.oft_blocks, m.rescale if m.rescaled else None, constraint=m.constraint, scale=1), None
    elif isinstance(m, FullModule):
        sd = m.custom_state_dict()
        return sd["diff"], sd.get("diff_b")
    elif isinstance(m, NormModule):
        return m.w_norm.detach(), (m.b_norm.detach() if getattr(m, "b_norm", None) is not None else None)
    else:
        raise TypeError(type(m))
    if getattr(m, "wd", False):  # DoRA on LoRA/LoHa/LoKr: W' = weight_decompose(W + ΔW) per output row or input column
        d = weight_decompose(w + d, m.dora_scale, 1, m.wd_on_out) - w
    return d.detach(), None


def reference_deltas(cp, net) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]]:
    names = lycoris_names(cp.pipe)
    modules = {c: dict(getattr(cp.pipe, c).named_modules()) for c in ("unet", "text_encoder", "text_encoder_2") if getattr(cp.pipe, c, None) is not None}
    out = {}
    for m in net.loras:
        comp, path = names[m.lora_name]
        out[(comp, path)] = lycoris_delta(m, modules[comp][path].weight)
    return out


class merged_into:
    """Context: the reference ΔW (and Δb) added into a pipeline's weights, restored on exit."""

    def __init__(self, cp, deltas):
        self.cp, self.deltas, self.saved = cp, deltas, []

    def __enter__(self):
        with torch.no_grad():
            for (comp, path), (dw, db) in self.deltas.items():
                module = getattr(self.cp.pipe, comp).get_submodule(path)
                self.saved.append((module, module.weight.data.clone(), None if module.bias is None else module.bias.data.clone()))
                module.weight.data += dw.reshape(module.weight.shape).to(module.weight.dtype)
                if db is not None:
                    module.bias.data += db.to(module.bias.dtype)
        return self.cp

    def __exit__(self, *exc):
        for module, w, b in self.saved:
            module.weight.data = w
            if b is not None:
                module.bias.data = b


# --- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipes():
    torch.set_num_threads(1)
    out = {}
    for family in ("sd1", "sdxl"):
        cp = ComposedPipeline.from_pretrained(f"tiny:{family}")
        out[family] = (cp, ComposedPipeline(copy.deepcopy(cp.pipe)))  # (ours, the reference copy)
    return out


def _generate(cp, loras=(), **params):
    return cp(PROMPT, negative_prompt=NEGATIVE, loras=list(loras), method="merge", method_params={"lora_scale": 1.0, **params}, **GEN).latents


def _sdxl_kwargs(pipe, g):
    if getattr(pipe, "text_encoder_2", None) is None:
        return {}
    return {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}}


# --- the checks -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lycoris_file_equals_lycoris_functional_forward_and_merged_reference(pipes, tmp_path, family, config):
    cp, ref = pipes[family]
    path, net, net_unet, net_tes = lycoris_network(cp, tmp_path, config, seed=len(config))
    info = read_lora_info(path)
    assert info.layout == "kohya" and set(info.kind.split("+")) == {k for t in CONFIGS[config][5] for k in t.split("+")}
    before = weights_hash(cp.pipe.unet) + weights_hash(cp.pipe.text_encoder)
    lora = cp.load_lora(path, "x")
    try:
        assert sum(len(m) for m in lora.layers.values()) == len(net.loras)  # every module became an adapter
        assert {l.kind for mods in lora.layers.values() for l in mods.values()} == CONFIGS[config][5]
        # per layer: ΔW (and Δb) equal LyCORIS' functional result
        deltas = reference_deltas(cp, net)
        worst = 0.0
        for (comp, mpath), (dw, db) in deltas.items():
            adapter = cp.routers[comp].layers[mpath].factors["x"]
            worst = max(worst, float((adapter.delta(torch.float32).reshape(dw.shape) - dw).abs().max()))
            if db is not None:
                worst = max(worst, float((adapter.bias_delta(torch.float32) - db).abs().max()))
        assert worst <= 1e-5, f"max |ΔW - LyCORIS| = {worst:.2e}"
        # the routed models equal LyCORIS' own forward of the network
        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, cp.pipe.unet.config.cross_attention_dim, generator=g)
        ids = torch.randint(0, 60, (2, 7), generator=g)
        extra = _sdxl_kwargs(cp.pipe, g)
        with torch.no_grad():
            for r in cp.routers.values():
                r.set_routing(Routing.uniform({"x": 1.0}))
            ours_unet = cp.pipe.unet(x, 10, encoder_hidden_states=ctx, **extra).sample
            ours_te = cp.pipe.text_encoder(ids).last_hidden_state
            for r in cp.routers.values():
                r.set_routing(None)
            theirs_unet = net_unet(x, 10, encoder_hidden_states=ctx, **extra).sample
            theirs_te = (net_tes[0] if isinstance(net_tes, list) else net_tes)(ids).last_hidden_state
        assert float((ours_unet - theirs_unet).abs().max()) <= 1e-5
        assert float((ours_te - theirs_te).abs().max()) <= 1e-5
        # a whole generation equals the base model with LyCORIS' ΔW merged into a copy of its weights
        with merged_into(ref, deltas):
            expected = _generate(ref)
        for fuse in (False, True):
            got = _generate(cp, [("x", 1.0)], fuse=fuse)
            assert float((got - expected).abs().max()) <= 1e-4, f"fuse={fuse}"
        assert float((expected - _generate(ref)).abs().max()) > 1e-3  # the file does change the image
    finally:
        cp.remove_lora("x")
    assert weights_hash(cp.pipe.unet) + weights_hash(cp.pipe.text_encoder) == before


def test_loha_and_lokr_scale_once_as_lycoris_training_forward(pipes, tmp_path):
    """alpha/dim is applied once, as LyCORIS' LoHa/LoKr modules do in their training forward (`get_weight`, which
    LyCORIS' functional diff_weight/kron_weight compute with the module's scale) and as ComfyUI and A1111 apply
    these files. (LyCORIS 4.1.3's module `get_diff_weight`, and so `merge_to`, multiplies by the scale a second
    time; loraloom follows the forward.)"""
    cp, _ = pipes["sd1"]
    for config in ("loha", "lokr"):
        path, net, _, _ = lycoris_network(cp, tmp_path, config, seed=3)
        lora = load_lora(path)
        names = lycoris_names(cp.pipe)
        for m in net.loras:
            comp, mpath = names[m.lora_name]
            assert m.scale != 1.0
            with torch.no_grad():
                forward_weight = m.get_weight(m.shape)
            ours = lora.layers[comp][mpath].delta(torch.float32)
            torch.testing.assert_close(ours.reshape(forward_weight.shape), forward_weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_dora_file_equals_peft_merge(pipes, tmp_path, family):
    """DoRA as PEFT trains it and diffusers saves it (`lora_magnitude_vector`, `use_dora` in the header): per layer ΔW
    equals PEFT's own merged weight minus the base, and a generation equals the base with PEFT's merge."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    cp, ref = pipes[family]
    pipe = copy.deepcopy(cp.pipe)
    targets = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    configs = {"unet": LoraConfig(r=4, lora_alpha=2, use_dora=True, init_lora_weights=False,
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in", "ff.net.2"]),
               "text_encoder": LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])}
    g = torch.Generator().manual_seed(5)
    layers = {}
    for comp, model in targets.items():
        if comp == "unet":
            model.add_adapter(configs[comp])  # diffusers' PEFT integration, as its training scripts do
        else:  # what transformers' add_adapter does (its own needs a newer PEFT than this environment's)
            inject_adapter_in_model(configs[comp], model)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, LoraLayer):
                    mod.lora_A["default"].weight.mul_(0.5)
                    mag = mod.lora_magnitude_vector["default"].weight
                    mag.mul_(1 + 0.2 * torch.randn(mag.shape, generator=g))
                    layers[(comp, name)] = mod
    sds = {f"{c}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m)) for c, m in targets.items()}
    meta = {"unet_lora_adapter_metadata": configs["unet"].to_dict(), "text_encoder_lora_adapter_metadata": configs["text_encoder"].to_dict()}
    type(pipe).save_lora_weights(str(tmp_path), **sds, **meta)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert set(read_lora_info(path).kind.split("+")) == {"DoRA"}
    # PEFT's merge of each layer: the reference ΔW
    deltas = {}
    with torch.no_grad():
        for (comp, name), mod in layers.items():
            base = mod.get_base_layer().weight.data.clone()
            mod.merge(safe_merge=True)
            deltas[(comp, name)] = (mod.get_base_layer().weight.data - base, None)
    lora = cp.load_lora(path, "d")
    try:
        assert sum(len(m) for m in lora.layers.values()) == len(deltas)
        worst = max(float((cp.routers[c].layers[p].factors["d"].delta(torch.float32).reshape(dw.shape) - dw).abs().max())
                    for (c, p), (dw, _) in deltas.items())
        assert worst <= 1e-5
        with merged_into(ref, deltas):
            expected = _generate(ref)
        for fuse in (False, True):
            assert float((_generate(cp, [("d", 1.0)], fuse=fuse) - expected).abs().max()) <= 1e-4
    finally:
        cp.remove_lora("d")


def test_simpletuner_lycoris_prefix_loads_as_the_unet(pipes, tmp_path):
    """LyCORIS' generic wrapper (`create_lycoris` on a bare UNet, as SimpleTuner trains) names modules `lycoris_…`."""
    from lycoris import create_lycoris

    cp, _ = pipes["sd1"]
    unet = copy.deepcopy(cp.pipe.unet)
    preset = tmp_path / "preset.toml"
    preset.write_text('target_module = ["Attention", "FeedForward"]\n')
    cls = lycoris.LycorisNetwork
    saved = {k: v for k, v in vars(cls).items() if k.isupper()}
    try:
        net = create_lycoris(unet, 1.0, linear_dim=2, linear_alpha=1.0, algo="lokr", preset=str(preset))
    finally:
        for k, v in saved.items():
            setattr(cls, k, v)
    net.apply_to()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path / "st.safetensors"
    net.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps({"algo": "lokr"})})
    lora = load_lora(path, unet_config=cp.pipe.unet.config)
    assert set(lora.layers) == {"unet"} and len(lora.layers["unet"]) == len(net.loras)
    cp.add_lora(lora)
    try:
        names = {f"lycoris_{n.replace('.', '_')}": n for n, _ in cp.pipe.unet.named_modules() if n}
        modules = dict(cp.pipe.unet.named_modules())
        for m in net.loras:
            dw, _ = lycoris_delta(m, modules[names[m.lora_name]].weight)
            ours = cp.routers["unet"].layers[names[m.lora_name]].factors[lora.name].delta(torch.float32)
            assert float((ours.reshape(dw.shape) - dw).abs().max()) <= 1e-5
    finally:
        cp.remove_lora(lora.name)


def test_listing_shows_each_files_type_and_memory(pipes, tmp_path, capsys):
    from loraloom.app.cli import main

    cp, _ = pipes["sd1"]
    for config in ("loha", "lokr", "dora", "oft", "mixed"):
        lycoris_network(cp, tmp_path, config)
    assert main(["loras", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for kind in ("LoHa", "LoKr", "DoRA", "OFT", "LoHa+LoKr+LoRA+norm"):
        assert kind in out
    assert main(["loras", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["lokr"]["type"] == "LoKr" and rows["lokr"]["cache_bytes"] == 0  # applied through its factors
    # the header-only estimate is what loading builds (fp32 files, fp32 model)
    for name in ("loha", "dora", "oft"):
        lora = cp.load_lora(tmp_path / f"{name}.safetensors", f"m-{name}")
        try:
            assert lora.cache_nbytes == rows[name]["cache_bytes"] > 0
            assert lora.nbytes == rows[name]["factor_bytes"]
        finally:
            cp.remove_lora(f"m-{name}")
