"""A tiny CLIP for the toy world: a transformers `CLIPModel` (ViT, 8-px patches on 32x32 images) trained
contrastively on scene images and their captions, saved with `CLIPProcessor` so any transformers-CLIP code
(CLIPScore included) loads it from the folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes as S

VISION = dict(image_size=S.SIZE, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, num_channels=3, hidden_act="quick_gelu")
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, hidden_act="quick_gelu")
PROJECTION = 64
MEAN = STD = [0.5, 0.5, 0.5]  # images in [-1, 1], like the VAE and the checker


def build_clip(tokenizer, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    text = {**TEXT, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config=VISION, projection_dim=PROJECTION)
    torch.manual_seed(seed)
    return CLIPModel(config)


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": S.SIZE}, do_center_crop=True, crop_size={"height": S.SIZE, "width": S.SIZE},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=MEAN, image_std=STD, do_convert_rgb=True,
        resample=3,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def clip_captions(scenes_, rng: np.random.Generator) -> list[str]:
    """Full captions (with or without the background phrase) and, for scenes with concepts, trigger lists
    (the ComposLoRA CLIPScore text)."""
    out = []
    for s in scenes_:
        u = rng.random()
        trig = S.trigger_text(s)
        if trig and u < 0.35:
            out.append(trig)
        else:
            out.append(S.caption(s, background=rng.random() >= 0.3))
    return out


def features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from `get_*_features` (the projected embedding is `pooler_output`)."""
    return out if torch.is_tensor(out) else out.pooler_output


def contrastive_loss(model, pixel_values, input_ids) -> torch.Tensor:
    out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    return out.loss


@torch.no_grad()
def retrieval_accuracy(model, processor, n: int = 100, seed: int = 424242, trigger_text: bool = False) -> float:
    """Text -> image top-1 among `n` fresh scenes with distinct captions (chance = 1 / n)."""
    rng = np.random.default_rng(seed)
    scenes_, seen = [], set()
    while len(scenes_) < n:
        s = S.sample_any_scene(rng)
        text = (S.trigger_text(s) or S.caption(s)) if trigger_text else S.caption(s)
        if text not in seen:
            seen.add(text)
            scenes_.append((s, text))
    images = S.render_batch([s for s, _ in scenes_])
    inputs = processor(text=[t for _, t in scenes_], images=list(images), return_tensors="pt", padding="max_length",
                       max_length=processor.tokenizer.model_max_length, truncation=True)
    model.eval()
    img = F.normalize(features(model.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
    txt = F.normalize(features(model.get_text_features(input_ids=inputs["input_ids"])), dim=-1)
    hits = (txt @ img.T).argmax(1) == torch.arange(n)
    return float(hits.float().mean())


def save_clip(model, processor, folder: Path) -> None:
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    model.to(torch.float32)
    processor.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_clip(folder: str | Path):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(folder, torch_dtype=torch.float32).eval(), CLIPProcessor.from_pretrained(folder)
