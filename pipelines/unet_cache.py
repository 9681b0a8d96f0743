"""DeepCache-style feature reuse for a diffusers UNet (Ma et al., CVPR 2024, "DeepCache"), as CMLoRA uses it.

A full pass also returns the deep features: the input of the last up block (the output of everything deeper,
upsampled). A shallow pass recomputes only the outermost level — `conv_in`, the ResNet/Transformer pairs of
`down_blocks[0]` (not its downsampler) and the last up block, fed with the cached deep features and fresh skip
connections — and `conv_out`. This is the cut CMLoRA's code uses on SD 1.5 (`cache_layer_id=0, cache_block_id=1`:
docs/methods/cmlora.md#feature-cache). LoRAs routed to the rows still act in the shallow
layers. With features from the same inputs, the shallow pass returns exactly the full pass's output.
"""

from __future__ import annotations

import torch


def check_feature_cache_support(unet) -> None:
    """The shallow pass needs the usual UNet2DConditionModel layout: the last up block consumes conv_in's output
    plus one skip per ResNet of down_blocks[0]."""
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
        raise ValueError("feature caching needs a UNet with at least two resolution levels")
    if len(unet.up_blocks[-1].resnets) != len(unet.down_blocks[0].resnets) + 1:
        raise ValueError("feature caching: the last up block does not pair with down_blocks[0] in this UNet")
    if getattr(unet.config, "class_embed_type", None) is not None or unet.config.addition_embed_type not in (None, "text_time", "text"):
        raise ValueError("feature caching supports SD 1.x/2.x/XL UNets (no class embeddings, image hints, ...)")


def full_pass(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal UNet output, plus the deep features (the hidden states entering the last up block)."""
    captured: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handle = unet.up_blocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                   return_dict=False)[0]
    finally:
        handle.remove()
    return out, captured[-1]


def shallow_pass(unet, sample, timestep, encoder_hidden_states, features, added_cond_kwargs=None) -> torch.Tensor:
    """UNet output from the outermost level only, with `features` (rows aligned with `sample`) standing in for
    everything deeper. Follows `UNet2DConditionModel.forward` step by step for the parts it keeps."""
    if features.shape[0] != sample.shape[0]:
        raise ValueError(f"cached features have {features.shape[0]} rows, the batch has {sample.shape[0]}")
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {})
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                               added_cond_kwargs=added_cond_kwargs)
    h = unet.conv_in(sample)
    skips = (h,)
    first = unet.down_blocks[0]
    attentions = getattr(first, "attentions", None)
    for i, resnet in enumerate(first.resnets):
        h = resnet(h, emb)
        if attentions is not None:
            h = attentions[i](h, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        skips += (h,)
    last = unet.up_blocks[-1]
    if getattr(last, "has_cross_attention", False):
        h = last(hidden_states=features, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=encoder_hidden_states)
    else:
        h = last(hidden_states=features, temb=emb, res_hidden_states_tuple=skips)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


__all__ = ["check_feature_cache_support", "full_pass", "shallow_pass"]
