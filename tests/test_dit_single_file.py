"""FLUX.1 and SD 3/3.5 base models from one original-layout .safetensors file, loaded offline with a config folder.

The files are the tiny FLUX and SD3 transformers rewritten by `tests/dit_checkpoint.py` into Black Forest Labs' and
Stability AI's layouts (diffusers' converters inverted key by key). The config folder is the same tiny pipeline
saved with `save_pretrained`, its transformer weights deleted, so the transformer must come from the single file.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from dit_checkpoint import DIT_PREFIX, flux_original_state_dict, save_original, sd3_original_state_dict, swap_halves
from safetensors.torch import save_file

from loraloom.pipelines import ComposedPipeline, ModelLoadError
from loraloom.pipelines.loading import single_file_family
from loraloom.pipelines.tiny_dit import build_tiny_flux, build_tiny_sd3

GEN = dict(num_inference_steps=2, seed=7, height=32, width=32, output_type="latent", progress_bar=False)
BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
LAYOUTS = {"flux": flux_original_state_dict, "sd3": sd3_original_state_dict}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared, busy CPU two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _TorchAtWidth:
    """`torch` as diffusers' FLUX converter sees it, with its split of `single_blocks.N.linear1` scaled to a tiny width.

    The converter hard-codes FLUX.1's width (`inner_dim = 3072`, MLP ratio 4) when it splits the fused q/k/v/MLP
    input; every FLUX.1 file has that width, a 32-wide test model does not. Everything else (key names, the other
    splits, the final layer's swap) stays diffusers' own code."""

    REAL = (3072, 3072, 3072, 4 * 3072)

    def __init__(self, width: int):
        self.width = width

    def __getattr__(self, name):
        return getattr(torch, name)

    def split(self, tensor, sizes, dim=0):
        if isinstance(sizes, (list, tuple)) and tuple(sizes) == self.REAL and tensor.shape[dim] != sum(sizes):
            sizes = (self.width,) * 3 + (4 * self.width,)
        return torch.split(tensor, sizes, dim=dim)


@pytest.fixture
def flux_width(monkeypatch):
    from diffusers.loaders import single_file_utils

    width = build_tiny_flux().transformer.inner_dim
    monkeypatch.setattr(single_file_utils, "torch", _TorchAtWidth(width))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """family -> (tiny pipeline, full diffusers folder, config folder without transformer weights, original file)."""
    root = tmp_path_factory.mktemp("dit_single_file")
    out = {}
    for family, build in BUILDERS.items():
        pipe = build()
        full, config = root / f"{family}-full", root / f"{family}-config"
        pipe.save_pretrained(full)
        shutil.copytree(full, config)
        removed = [*(config / "transformer").glob("*.safetensors"), *(config / "transformer").glob("*.bin")]
        assert removed
        for weights in removed:
            weights.unlink()
        ckpt = save_original(LAYOUTS[family](pipe.transformer), root / f"tiny-{family}.safetensors")
        out[family] = (pipe, full, config, ckpt)
    return out


def test_files_have_the_original_layouts(files):
    flux, sd3 = files["flux"][0].transformer, files["sd3"][0].transformer
    bfl = flux_original_state_dict(flux)
    block, single = flux.transformer_blocks[0], flux.single_transformer_blocks[0]
    attn = block.attn
    assert torch.equal(bfl["double_blocks.0.img_attn.qkv.weight"], torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    assert torch.equal(bfl["double_blocks.0.txt_attn.qkv.bias"], torch.cat([attn.add_q_proj.bias, attn.add_k_proj.bias, attn.add_v_proj.bias]))
    assert torch.equal(bfl["double_blocks.0.txt_attn.norm.key_norm.scale"], attn.norm_added_k.weight)
    sa = single.attn
    assert torch.equal(bfl["single_blocks.0.linear1.weight"], torch.cat([sa.to_q.weight, sa.to_k.weight, sa.to_v.weight, single.proj_mlp.weight]))
    assert torch.equal(bfl["single_blocks.0.linear2.weight"], single.proj_out.weight)
    # BFL's LastLayer: shift, scale = adaLN_modulation(vec).chunk(2); diffusers' norm_out: scale, shift.
    scale, shift = flux.norm_out.linear.weight.chunk(2)
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    assert not any(k.startswith(("transformer_blocks", "x_embedder", "norm_out")) for k in bfl)

    sai = sd3_original_state_dict(sd3)
    assert all(k.startswith(DIT_PREFIX) for k in sai)
    last = sd3.transformer_blocks[-1]
    assert torch.equal(sai[DIT_PREFIX + "joint_blocks.1.context_block.attn.qkv.weight"],
                       torch.cat([last.attn.add_q_proj.weight, last.attn.add_k_proj.weight, last.attn.add_v_proj.weight]))
    assert torch.equal(sai[DIT_PREFIX + "joint_blocks.1.context_block.adaLN_modulation.1.bias"],
                       swap_halves(last.norm1_context.linear.bias))
    assert DIT_PREFIX + "joint_blocks.1.context_block.mlp.fc1.weight" not in sai  # pre-only context block
    assert torch.equal(sai[DIT_PREFIX + "pos_embed"], sd3.pos_embed.pos_embed)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_family_is_read_from_the_keys(files, family, tmp_path):
    assert single_file_family(files[family][3]) == family
    assert single_file_family(files[family][3], family) == family
    if family == "flux":  # ComfyUI saves the BFL layout under the LDM prefix
        comfy = save_original(flux_original_state_dict(files["flux"][0].transformer, DIT_PREFIX), tmp_path / "comfy.safetensors")
        assert single_file_family(comfy) == "flux"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_single_file_loads_offline_with_every_weight_and_same_generation(files, family, flux_width):
    pipe, full, config, ckpt = files[family]
    loaded = ComposedPipeline.from_pretrained(str(ckpt), config=str(config), local_files_only=True)
    assert loaded.family == family and type(loaded.pipe) is type(pipe)
    want, got = pipe.transformer.state_dict(), loaded.pipe.transformer.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    reference = ComposedPipeline.from_pretrained(str(full), local_files_only=True)
    latents = [_realigned(cp)("a lighthouse", **GEN).latents for cp in (loaded, reference)]
    torch.testing.assert_close(*latents, rtol=0, atol=0)


def _realigned(cp: ComposedPipeline) -> ComposedPipeline:
    """Every weight copied into freshly allocated memory. Weights read from a memory-mapped file keep the file's byte
    offsets, and CPU matmuls over differently aligned (but equal) weights round apart (~1e-7, seen here on FLUX):
    this takes that out, so the generations compare exactly."""
    for module in cp.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for param in module.parameters():
                param.data = param.data.clone()
    return cp


def test_comfy_prefixed_flux_file_loads(files, flux_width, tmp_path):
    pipe, _, config, _ = files["flux"]
    comfy = save_original(flux_original_state_dict(pipe.transformer, DIT_PREFIX), tmp_path / "comfy-flux.safetensors")
    loaded = ComposedPipeline.from_pretrained(str(comfy), config=str(config), local_files_only=True, family="flux")
    want = pipe.transformer.state_dict()
    assert all(torch.equal(loaded.pipe.transformer.state_dict()[k], v) for k, v in want.items())


def test_refusals_name_the_file(files, tmp_path):
    _, _, config, flux_ckpt = files["flux"]
    kw = dict(config=str(config), local_files_only=True)
    with pytest.raises(ModelLoadError, match=r"tiny-flux\.safetensors: the family was given as sd3, but the file's keys "
                                             r"are a FLUX\.1 checkpoint's"):
        ComposedPipeline.from_pretrained(str(flux_ckpt), family="sd3", **kw)
    with pytest.raises(ModelLoadError, match=r"tiny-sd3\.safetensors: the family was given as sdxl.*SD 3/3\.5"):
        ComposedPipeline.from_pretrained(str(files["sd3"][3]), family="sdxl", **kw)

    unknown = tmp_path / "mystery.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.randn(6, 2), "head.weight": torch.randn(2)}, str(unknown))
    with pytest.raises(ModelLoadError, match=r"mystery\.safetensors: not a Stable Diffusion checkpoint \(SD 1\.x/2\.x/XL, "
                                             r"SD 3/3\.5 or FLUX\.1\)"):
        ComposedPipeline.from_pretrained(str(unknown), **kw)

    chroma = tmp_path / "chroma.safetensors"
    save_file({"distilled_guidance_layer.in_proj.bias": torch.zeros(2),
               "double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(2)}, str(chroma))
    with pytest.raises(ModelLoadError, match=r"chroma\.safetensors: a Chroma checkpoint"):
        ComposedPipeline.from_pretrained(str(chroma), **kw)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_no_model_config_says_what_to_pass(files, family, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here in any case
    ckpt = files[family][3]
    with pytest.raises(ModelLoadError, match=rf"tiny-{family}\.safetensors: a .* single file needs the model config "
                                             r"\(--model-config / model_config\): a diffusers \w+Pipeline folder"):
        ComposedPipeline.from_pretrained(str(ckpt), local_files_only=True)


def test_wrong_model_config_is_named(files, flux_width, tmp_path):
    # An SD3 folder as the config of a FLUX file: refused before loading, naming both.
    with pytest.raises(ModelLoadError, match=r"tiny-flux\.safetensors: a FLUX\.1 checkpoint, but the model config "
                                             r".*sd3-config is a StableDiffusion3Pipeline folder; give a diffusers "
                                             r"FluxPipeline folder"):
        ComposedPipeline.from_pretrained(str(files["flux"][3]), config=str(files["sd3"][2]), local_files_only=True)
    # A config folder whose pipeline cannot be built: diffusers' reason, with the file and the config named.
    broken = tmp_path / "broken"
    shutil.copytree(files["flux"][2], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match=r"tiny-flux\.safetensors: cannot load as a single-file FLUX\.1 checkpoint "
                                             r"with the model config .*broken \("):
        ComposedPipeline.from_pretrained(str(files["flux"][3]), config=str(broken), local_files_only=True)


def test_generate_spec_with_a_flux_single_file(files, flux_width, tmp_path, capsys):
    from loraloom.app.cli import main

    pipe, full, config, ckpt = files["flux"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "model": str(ckpt), "model_config": str(config), "local_files_only": True, "loras": [],
        "prompts": ["a lighthouse"], "methods": ["merge"], "seeds": [3], "steps": 2, "height": 32, "width": 32,
        "out": str(tmp_path / "out"),
    }))
    assert main(["generate", str(spec)]) == 0, capsys.readouterr().err
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 1 and "1 image(s) written" in capsys.readouterr().out


def test_sd3_file_with_its_vae_loads_both_from_the_file(files, tmp_path):
    """sd3_medium.safetensors' layout: the MMDiT and the VAE (`first_stage_model.*`), no text encoders. Both models
    come from the file (the config folder's VAE weights are deleted too); the encoders from the config folder."""
    from ldm_checkpoint import vae_to_ldm

    pipe, full, config, _ = files["sd3"]
    ckpt = save_original({**sd3_original_state_dict(pipe.transformer), **vae_to_ldm(pipe.vae)}, tmp_path / "sd3-vae.safetensors")
    no_vae = tmp_path / "config-without-vae-weights"
    shutil.copytree(config, no_vae)
    for weights in (no_vae / "vae").glob("*.safetensors"):
        weights.unlink()
    loaded = ComposedPipeline.from_pretrained(str(ckpt), config=str(no_vae), local_files_only=True)
    for comp in ("transformer", "vae"):
        want, got = getattr(pipe, comp).state_dict(), getattr(loaded.pipe, comp).state_dict()
        assert set(got) == set(want), comp
        assert all(torch.equal(got[k], v) for k, v in want.items()), comp
    reference = ComposedPipeline.from_pretrained(str(full), local_files_only=True)
    gen = {**GEN, "output_type": "pil"}  # decoded: the VAE read from the file takes part
    images = [np.asarray(_realigned(cp)("a lighthouse", **gen).images[0]) for cp in (loaded, reference)]
    assert images[0].shape == (32, 32, 3) and np.array_equal(*images)


def test_all_in_one_flux_file_loads_every_model_from_the_file(files, flux_width, tmp_path):
    """An all-in-one save (ComfyUI's checkpoint save): the BFL transformer under `model.diffusion_model.`, the VAE
    (`first_stage_model.*`), CLIP-L (`text_encoders.clip_l.transformer.text_model.*`) and T5
    (`text_encoders.t5xxl.transformer.*`). Only tokenizers and scheduler come from the config folder, whose model
    weights are all deleted here."""
    from ldm_checkpoint import vae_to_ldm

    pipe, full, config, _ = files["flux"]
    state = {**flux_original_state_dict(pipe.transformer, DIT_PREFIX), **vae_to_ldm(pipe.vae)}
    state.update({"text_encoders.clip_l.transformer.text_model." + k.removeprefix("text_model."): v
                  for k, v in pipe.text_encoder.state_dict().items()})
    state.update({"text_encoders.t5xxl.transformer." + k: v for k, v in pipe.text_encoder_2.state_dict().items()})
    ckpt = save_original({k: v.clone().contiguous() for k, v in state.items()}, tmp_path / "flux-aio.safetensors")
    bare = tmp_path / "config-without-weights"
    shutil.copytree(config, bare)
    for weights in bare.rglob("*.safetensors"):
        weights.unlink()
    loaded = ComposedPipeline.from_pretrained(str(ckpt), config=str(bare), local_files_only=True)
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(pipe, comp).state_dict(), getattr(loaded.pipe, comp).state_dict()
        assert set(got) == set(want), comp
        assert all(torch.equal(got[k], v) for k, v in want.items()), comp
    reference = ComposedPipeline.from_pretrained(str(full), local_files_only=True)
    gen = {**GEN, "output_type": "pil"}
    images = [np.asarray(_realigned(cp)("a lighthouse", **gen).images[0]) for cp in (loaded, reference)]
    assert np.array_equal(*images)
