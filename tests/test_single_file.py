"""Base models from one original-layout (CompVis/LDM) .safetensors file, loaded offline with a diffusers config folder.

The checkpoint is the tiny SD 1.x pipeline rewritten by `tests/ldm_checkpoint.py`; the config folder is the same
pipeline saved with `save_pretrained` and then stripped of its weights, so every weight must come from the single file.
"""

from __future__ import annotations

import pytest
import torch
from ldm_checkpoint import CLIP_PREFIX, SCHEDULE_KEYS, UNET_PREFIX, VAE_PREFIX, ldm_state_dict, save_ldm_checkpoint
from safetensors.torch import save_file

from loraloom.pipelines import ComposedPipeline, ModelLoadError
from loraloom.pipelines.tiny import build_tiny_sd, write_random_lora

COMPONENTS = ("unet", "vae", "text_encoder")
GEN = dict(num_inference_steps=2, seed=7, scheduler="default", output_type="latent", progress_bar=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared, busy CPU two threads wait on each other (2 steps took 7 s instead of 0.6 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(tiny pipeline, configs-only diffusers folder, its single-file checkpoint)."""
    root = tmp_path_factory.mktemp("single_file")
    pipe = build_tiny_sd()
    folder = root / "config"
    pipe.save_pretrained(folder)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    ckpt = save_ldm_checkpoint(pipe, root / "tiny-sd1.safetensors")
    return pipe, folder, ckpt


def test_checkpoint_has_the_original_layout(files):
    pipe, _, _ = files
    sd = ldm_state_dict(pipe)
    n = {c: len(getattr(pipe, c).state_dict()) for c in COMPONENTS}
    assert sum(k.startswith(UNET_PREFIX) for k in sd) == n["unet"]
    assert sum(k.startswith(VAE_PREFIX) for k in sd) == n["vae"]
    assert sum(k.startswith(CLIP_PREFIX) for k in sd) == n["text_encoder"] + 1  # + position_ids, as in real files
    assert set(SCHEDULE_KEYS) <= set(sd) and len(sd) == sum(n.values()) + 1 + len(SCHEDULE_KEYS)
    # Landmarks of the layout: the down-sampler entry, the up-sampler after a transformer, ResBlock names,
    # the decoder levels numbered by resolution, and the VAE's mid attention as 1x1 convolutions.
    unet, vae = pipe.unet, pipe.vae
    landmarks = {
        UNET_PREFIX + "input_blocks.3.0.op.weight": unet.down_blocks[0].downsamplers[0].conv.weight,
        UNET_PREFIX + "output_blocks.2.2.conv.weight": unet.up_blocks[0].upsamplers[0].conv.weight,
        UNET_PREFIX + "middle_block.2.emb_layers.1.weight": unet.mid_block.resnets[1].time_emb_proj.weight,
        UNET_PREFIX + "output_blocks.0.0.skip_connection.weight": unet.up_blocks[0].resnets[0].conv_shortcut.weight,
        VAE_PREFIX + "decoder.up.0.block.0.nin_shortcut.weight": vae.decoder.up_blocks[1].resnets[0].conv_shortcut.weight,
        VAE_PREFIX + "decoder.up.1.upsample.conv.weight": vae.decoder.up_blocks[0].upsamplers[0].conv.weight,
        VAE_PREFIX + "decoder.mid.attn_1.q.weight": vae.decoder.mid_block.attentions[0].to_q.weight[:, :, None, None],
    }
    for key, value in landmarks.items():
        assert sd[key].shape == value.shape and torch.equal(sd[key], value), key


def test_single_file_loads_offline_with_every_weight_and_same_generation(files):
    pipe, folder, ckpt = files
    loaded = ComposedPipeline.from_pretrained(str(ckpt), config=str(folder), local_files_only=True)
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline" and loaded.family == "sd1"
    for comp in COMPONENTS:
        want, got = getattr(pipe, comp).state_dict(), getattr(loaded.pipe, comp).state_dict()
        assert set(got) == set(want), comp
        for key, value in want.items():
            assert got[key].device.type == "cpu" and got[key].dtype == value.dtype, (comp, key)
            assert torch.equal(got[key], value), (comp, key)
    reference = ComposedPipeline(build_tiny_sd())("a lighthouse", **GEN).latents
    torch.testing.assert_close(loaded("a lighthouse", **GEN).latents, reference, rtol=0, atol=0)


def test_bad_single_files_name_the_file(files, tmp_path):
    pipe, folder, ckpt = files
    kw = dict(config=str(folder), local_files_only=True)

    lora = write_random_lora(pipe, tmp_path / "my-style.safetensors")
    with pytest.raises(ModelLoadError, match=r"my-style\.safetensors: this is a LoRA.*not a base model"):
        ComposedPipeline.from_pretrained(str(lora), **kw)

    random = tmp_path / "random.safetensors"
    save_file({"foo": torch.randn(3, 3), "bar.weight": torch.randn(4)}, str(random))
    with pytest.raises(ModelLoadError, match=r"random\.safetensors: not a Stable Diffusion checkpoint"):
        ComposedPipeline.from_pretrained(str(random), **kw)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelLoadError, match=r"corrupt\.safetensors: not a readable \.safetensors file"):
        ComposedPipeline.from_pretrained(str(corrupt), **kw)

    # A UNet without its text encoder: diffusers' own reason comes through, without its API advice.
    partial = tmp_path / "unet-and-vae-only.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(pipe).items() if not k.startswith(CLIP_PREFIX)}, str(partial))
    with pytest.raises(ModelLoadError, match=r"unet-and-vae-only\.safetensors: cannot load .*CLIPTextModel") as info:
        ComposedPipeline.from_pretrained(str(partial), **kw)
    assert "from_pretrained('...')" not in str(info.value)


def test_single_file_config_and_family_problems(files, monkeypatch):
    pipe, folder, ckpt = files
    # No config: even with local_files_only=True diffusers then tries to download the SD 1.5 configs from the hub
    # (single_file.py, LocalEntryNotFoundError branch). Offline that fails, and the error says what to pass.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read per request: no network here
    with pytest.raises(ModelLoadError, match=r"tiny-sd1\.safetensors: cannot load.*model config"):
        ComposedPipeline.from_pretrained(str(ckpt), local_files_only=True)
    # family=sdxl on an SD 1.x checkpoint would build an SDXL pipeline without its second text encoder.
    with pytest.raises(ModelLoadError, match=r"tiny-sd1\.safetensors: the family was given as sdxl.*load as sd1"):
        ComposedPipeline.from_pretrained(str(ckpt), config=str(folder), local_files_only=True, family="sdxl")
