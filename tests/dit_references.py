"""Helpers for the FLUX.1 / SD3 tests: LoRA files of each layout written by their producers' conventions, and
diffusers reference generations (its own `load_lora_weights`, `set_adapters`, and per-LoRA loops)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from loraloom.pipelines.tiny import random_lora_state_dict

FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear")
SD3_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SIZE = 32


def write_peft_lora(pipe, folder, name, *, seed=0, rank=4, alpha=8, targets=FLUX_TARGETS, text_encoder=True, metadata=None,
                    std=0.1):
    """The diffusers/PEFT layout as diffusers' own `save_lora_weights` writes it (LoraConfig in the header)."""
    layers = random_lora_state_dict(pipe.transformer, rank, seed=seed, targets=targets, std=std)
    te = random_lora_state_dict(pipe.text_encoder, rank, seed=seed + 100, targets=TE_TARGETS, std=std) if text_encoder else None
    kwargs = {"transformer_lora_layers": layers,
              "transformer_lora_adapter_metadata": {"r": rank, "lora_alpha": alpha, "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in layers})}}
    if te:
        kwargs.update(text_encoder_lora_layers=te, text_encoder_lora_adapter_metadata={
            "r": rank, "lora_alpha": alpha, "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in te})})
    type(pipe).save_lora_weights(str(folder), weight_name=f"{name}.safetensors", **kwargs)
    path = folder / f"{name}.safetensors"
    if metadata:  # add header fields (e.g. modelspec.architecture) as trainers do
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        save_file(tensors, str(path), metadata={**meta, **metadata})
    return path


def write_kohya_flux_lora(folder, name, *, seed=0, rank=4, alpha=2.0, inner=32, mlp=128):
    """sd-scripts' FLUX layout (`lora_unet_double_blocks_0_img_attn_qkv`: fused q/k/v; `single_blocks_0_linear2`).
    The fused single-block `linear1` is left out: diffusers' converter splits it at FLUX.1's real widths only."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def pair(module, n_in, n_out):
        sd[f"{module}.lora_down.weight"] = torch.randn(rank, n_in, generator=g) * 0.1
        sd[f"{module}.lora_up.weight"] = torch.randn(n_out, rank, generator=g) * 0.1
        sd[f"{module}.alpha"] = torch.tensor(float(alpha))

    for s in ("img", "txt"):
        pair(f"lora_unet_double_blocks_0_{s}_attn_qkv", inner, 3 * inner)
        pair(f"lora_unet_double_blocks_0_{s}_attn_proj", inner, inner)
        pair(f"lora_unet_double_blocks_0_{s}_mlp_0", inner, mlp)
        pair(f"lora_unet_double_blocks_0_{s}_mlp_2", mlp, inner)
    pair("lora_unet_single_blocks_0_linear2", inner + mlp, inner)
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path), metadata={"ss_base_model_version": "flux1", "ss_network_dim": str(rank)})
    return path


def write_lora_transformer_flux_lora(folder, name, *, seed=0, rank=4, alpha=2.0, inner=32):
    """kohya-style names of diffusers' module paths (`lora_transformer_transformer_blocks_0_attn_to_q`,
    `lora_transformer_single_transformer_blocks_0_attn_to_k`; alpha per module), the spelling diffusers' FLUX
    converter calls a mixture (attention projections only: it maps no other block layer)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    modules = [f"lora_transformer_transformer_blocks_0_attn_{p}" for p in ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj",
                                                                          "add_k_proj", "add_v_proj", "to_add_out")]
    modules += [f"lora_transformer_single_transformer_blocks_0_attn_{p}" for p in ("to_q", "to_k", "to_v")]
    for module in modules:
        sd[f"{module}.lora_down.weight"] = torch.randn(rank, inner, generator=g) * 0.1
        sd[f"{module}.lora_up.weight"] = torch.randn(inner, rank, generator=g) * 0.1
        sd[f"{module}.alpha"] = torch.tensor(float(alpha))
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def write_xlabs_flux_lora(folder, name, *, seed=0, rank=4, inner=32):
    """XLabs' FLUX layout (`double_blocks.0.processor.qkv_lora1.down.weight`: fused q/k/v of the image stream,
    `proj_lora1` its output; `qkv_lora2`/`proj_lora2` the text stream's; no alpha)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for stream in ("1", "2"):
        for kind, n_out in (("qkv", 3 * inner), ("proj", inner)):
            key = f"double_blocks.0.processor.{kind}_lora{stream}"
            sd[f"{key}.down.weight"] = torch.randn(rank, inner, generator=g) * 0.1
            sd[f"{key}.up.weight"] = torch.randn(n_out, rank, generator=g) * 0.1
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def _pairs(sd, g, rank, alpha, modules):
    """kohya-style `lora_down`/`lora_up` (and `alpha` unless None) for {module key: (n_in, n_out)}."""
    for module, (n_in, n_out) in modules.items():
        sd[f"{module}.lora_down.weight"] = torch.randn(rank, n_in, generator=g) * 0.1
        sd[f"{module}.lora_up.weight"] = torch.randn(n_out, rank, generator=g) * 0.1
        if alpha is not None:
            sd[f"{module}.alpha"] = torch.tensor(float(alpha))


def _clip_modules(prefix, sep, hidden=32, mlp=37, attention=True):
    """The tiny CLIP's layer-0 attention and MLP modules in a producer's spelling (`sep`: `_` for kohya, `.` for
    dotted paths). diffusers 0.42's FLUX loader drops the attention projections of kohya/ComfyUI files (its converter
    spells them `self_attn.to_q_lora`, which its text-encoder loader reports as unexpected keys): `attention=False`
    writes the MLP only, for comparisons with diffusers' own loading."""
    base = sep.join(["text_model", "encoder", "layers", "0"])
    attn, mlp_ = f"{base}{sep}self_attn{sep}", f"{base}{sep}mlp{sep}"
    out = {f"{prefix}{attn}q_proj": (hidden, hidden), f"{prefix}{attn}v_proj": (hidden, hidden)} if attention else {}
    return {**out, f"{prefix}{mlp_}fc1": (hidden, mlp), f"{prefix}{mlp_}fc2": (mlp, hidden)}


def write_kohya_te_flux_lora(folder, name, *, seed=0, rank=4, alpha=2.0, inner=32, mlp=128, attention=True):
    """sd-scripts' FLUX layout with the CLIP-L part it trains (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`,
    `…_mlp_fc1`; sd-scripts calls T5 `lora_te3_`, which diffusers' converter does not load)."""
    path = write_kohya_flux_lora(folder, name, seed=seed, rank=rank, alpha=alpha, inner=inner, mlp=mlp)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    _pairs(sd, torch.Generator().manual_seed(seed + 100), rank, alpha, _clip_modules("lora_te1_", "_", attention=attention))
    save_file(sd, str(path), metadata=header(path))
    return path


def write_comfyui_flux_lora(folder, name, *, seed=0, rank=4, alpha=2.0, inner=32, mlp=128, attention=True):
    """ComfyUI's FLUX layout (its LoRA saver; ai-toolkit's ComfyUI export): BFL module paths under `diffusion_model.`
    with kohya's `lora_down`/`lora_up`/`alpha` (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`), the
    CLIP-L part under `text_encoders.clip_l.transformer.`."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for s in ("img", "txt"):
        modules.update({f"diffusion_model.double_blocks.0.{s}_attn.qkv": (inner, 3 * inner),
                        f"diffusion_model.double_blocks.0.{s}_attn.proj": (inner, inner),
                        f"diffusion_model.double_blocks.0.{s}_mlp.0": (inner, mlp),
                        f"diffusion_model.double_blocks.0.{s}_mlp.2": (mlp, inner),
                        f"diffusion_model.double_blocks.0.{s}_mod.lin": (inner, 6 * inner)})
    modules["diffusion_model.single_blocks.0.linear2"] = (inner + mlp, inner)
    modules.update(_clip_modules("text_encoders.clip_l.transformer.", ".", attention=attention))
    sd = {}
    _pairs(sd, g, rank, alpha, modules)
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def write_onetrainer_flux_lora(folder, name, *, seed=0, rank=4, alpha=2.0, inner=32):
    """OneTrainer's FLUX layout: kohya-style spellings of diffusers' module paths (`lora_transformer_…_attn_to_q`) with
    the CLIP-L part as `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` (diffusers' converter maps the
    transformer blocks' attention projections and CLIP's attention and MLP)."""
    path = write_lora_transformer_flux_lora(folder, name, seed=seed, rank=rank, alpha=alpha, inner=inner)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    _pairs(sd, torch.Generator().manual_seed(seed + 100), rank, alpha, _clip_modules("lora_te1_", "_"))
    save_file(sd, str(path))
    return path


def write_peft_down_flux_lora(pipe, folder, name, *, seed=0, rank=4, targets=FLUX_TARGETS):
    """diffusers module paths with kohya's factor names (`transformer.transformer_blocks.0.attn.to_q.lora_down.weight`,
    no alpha), the mixed spelling some trainers and converters (fal, Civitai re-uploads) write."""
    layers = random_lora_state_dict(pipe.transformer, rank, seed=seed, targets=targets, std=0.1)
    sd = {"transformer." + k.replace("lora_A.weight", "lora_down.weight").replace("lora_B.weight", "lora_up.weight"): v
          for k, v in layers.items()}
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def write_kohya_lycoris_flux_lora(folder, name, modules, metadata=None):
    """A LyCORIS file in the kohya FLUX names lycoris-lora and sd-scripts write: {BFL module in kohya spelling
    (`double_blocks_0_img_attn_qkv`, `single_blocks_0_linear1`, `final_layer_adaLN_modulation_1`): {part: tensor}}
    -> `lora_unet_double_blocks_0_img_attn_qkv.lokr_w1`, `….alpha`, …"""
    sd = {f"lora_unet_{module}.{part}": value.contiguous() for module, parts in modules.items() for part, value in parts.items()}
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path), metadata=metadata or {"ss_base_model_version": "flux1", "ss_network_module": "lycoris.kohya"})
    return path


def unpack(pipe, latents, size=SIZE):
    """FLUX's packed output latents -> (B, C, h, w), as loraloom keeps them; other families' latents unchanged."""
    if latents.ndim == 3:
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, size, size, pipe.vae_scale_factor)
    return latents


def our_latents(cp, loras, prompt, steps, guidance, method="merge", size=SIZE, **params):
    """loraloom's latents for one generation on a tiny pipeline (`params`: the method's), seed 0, no progress bar."""
    return cp(prompt, loras=list(loras), method=method, method_params=params, num_inference_steps=steps, height=size,
              width=size, guidance_scale=guidance, seed=0, output_type="latent", progress_bar=False).latents


def diffusers_latents(pipe, prompt, steps, guidance, seed=0, size=SIZE, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images
    return unpack(pipe, out, size)


def switch_reference(pipe, names, scale, prompt, steps, guidance, interval=1):
    """LoRA Switch through diffusers: `set_adapters` to the active LoRA, changed in `callback_on_step_end`."""
    active = lambda i: names[(i // interval) % len(names)]  # noqa: E731
    pipe.set_adapters([active(0)], [scale])

    def on_step(p, i, t, kw):
        p.set_adapters([active(i + 1)], [scale])
        return kw

    return diffusers_latents(pipe, prompt, steps, guidance, callback_on_step_end=on_step)


@torch.no_grad()
def composite_reference(pipe, names, scale, prompt, steps, guidance, predict_one, size=SIZE):
    """LoRA Composite through diffusers: each step, `set_adapters` to each LoRA in turn and average the (guided)
    predictions. `predict_one(latents, t)` is the family's guided prediction with the adapters as set."""
    latents, sched = _start(pipe, steps, size)
    for t in sched.timesteps:
        preds = []
        for n in names:
            pipe.set_adapters([n], [scale])
            preds.append(predict_one(latents, t))
        latents = sched.step(torch.stack(preds).mean(0), t, latents, return_dict=False)[0]
    return unpack(pipe, latents, size)


def _start(pipe, steps, size=SIZE):
    """Initial latents and the scheduler with its timesteps, as the pipeline's own __call__ sets them."""
    import numpy as np
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    g = torch.Generator().manual_seed(0)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if isinstance(pipe, FluxPipeline):
        latents, _ = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, size, size, dtype, device, g)
        c = sched.config
        mu = calculate_shift(latents.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        retrieve_timesteps(sched, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, size, size, dtype, device, g)
        retrieve_timesteps(sched, steps, device)
    return latents, sched


def flux_predict(pipe, prompt, guidance, size=SIZE, **encode):
    """One FLUX.1 dev prediction on packed latents, as FluxPipeline's loop makes it."""
    device = pipe.transformer.device
    embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, device=device, **encode)
    side = size // pipe.vae_scale_factor // 2
    img_ids = pipe._prepare_latent_image_ids(1, side, side, device, embeds.dtype)

    def predict(latents, t):
        return pipe.transformer(hidden_states=latents, timestep=t.expand(1).to(latents.dtype) / 1000,
                                guidance=torch.full([1], guidance, device=device),
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=img_ids,
                                return_dict=False)[0]

    return predict


def sd3_predict(pipe, prompt, guidance, size=SIZE, negative_prompt="", **encode):
    """One SD3 prediction with classifier-free guidance, as StableDiffusion3Pipeline's loop makes it."""
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, None, None, device=pipe.transformer.device, negative_prompt=negative_prompt, **encode)

    def predict(latents, t):
        out = pipe.transformer(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2),
                               encoder_hidden_states=torch.cat([neg, pos]), pooled_projections=torch.cat([neg_pooled, pooled]),
                               return_dict=False)[0]
        u, c = out.chunk(2)
        return u + guidance * (c - u)

    return predict


def header(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})
