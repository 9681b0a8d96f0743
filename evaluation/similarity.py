"""Image–image fidelity: cosine similarity between a generated image and reference images of a subject or style.

Two encoders, as in K-LoRA (docs/methods/klora.md#evaluation: "Style Sim" = CLIP-I to the style reference, subject = CLIP-I and DINO to the
subject references) and DreamBooth before it:

- **CLIP-I**: L2-normalised CLIP image embeddings, with the CLIP model's own preprocessing (a `CLIPScorer`).
- **DINO**: the CLS token of the last layer (after its layer norm) of a transformers `Dinov2Model` or a DINO
  `ViTModel` (`facebook/dino-vits16`), with the preprocessing pinned here rather than taken from whatever
  processor config a checkpoint ships: resize the short side to 256 (bicubic) → centre crop 224 → ImageNet mean/std
  (`DinoPreprocess`). Preprocessing alone moves DINO scores by about 2 points, so it is part of `describe()`.

A fidelity score is the mean cosine over the references (raw cosine in [-1, 1]; papers print it ×100 as "%").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from loraloom.evaluation.clipscore import CLIPScorer, hub_offline, locate_model, resolve_device
from loraloom.evaluation.errors import EvaluationError
from loraloom.evaluation.images import ImageLike, load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(Protocol):
    def image_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """L2-normalised embeddings (N, D) on the CPU."""

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class DinoPreprocess:
    """Resize the short side to `resize` (bicubic), centre-crop `crop`×`crop`, scale to [0, 1], normalise."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        s = self.resize / min(w, h)
        image = image.resize((max(self.crop, round(w * s)), max(self.crop, round(h * s))), Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        x = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]


class DinoEncoder:
    """DINO / DINOv2 CLS embeddings from a transformers folder or hub id (`local_files_only` by default)."""

    def __init__(self, path_or_id: str | Path, device: str | torch.device = "auto", local_files_only: bool = True,
                 preprocess: DinoPreprocess = DinoPreprocess(), batch_size: int = 16):
        fix = "pass a local folder with a Dinov2Model or DINO ViTModel, or local_files_only=False to fetch it once"
        where = locate_model(path_or_id, "DINO model", fix, local_files_only)
        from transformers import AutoModel

        try:
            with hub_offline(local_files_only):
                model = AutoModel.from_pretrained(path_or_id, local_files_only=local_files_only)
        except Exception as err:  # OSError, ValueError, a corrupt weights file …: one line, never a traceback
            raise EvaluationError(f"DINO {where} {str(path_or_id)!r} cannot be loaded ({' '.join(str(err).split())}). "
                                  f"Fix: {fix}.") from None
        self._setup(model, str(path_or_id), device, preprocess, batch_size)

    @classmethod
    def from_model(cls, model, name: str = "in-memory", device: str | torch.device = "auto",
                   preprocess: DinoPreprocess = DinoPreprocess(), batch_size: int = 16):
        self = cls.__new__(cls)
        self._setup(model, name, device, preprocess, batch_size)
        return self

    def _setup(self, model, name, device, preprocess, batch_size) -> None:
        kind = type(model).__name__
        if kind not in ("Dinov2Model", "Dinov2WithRegistersModel", "ViTModel"):
            raise EvaluationError(f"{name}: {kind} is not a DINO encoder (expected Dinov2Model or ViTModel)")
        self.device = resolve_device(device)
        self.model, self.name, self.preprocess, self.batch_size = model.to(self.device).eval(), name, preprocess, batch_size
        # ViT needs its position embeddings interpolated when the crop differs from its training size; DINOv2 always does
        self._kwargs = {"interpolate_pos_encoding": True} if kind == "ViTModel" else {}

    def describe(self) -> dict:
        return {"encoder": "dino", "model": self.name, "feature": "CLS of last layer (post-norm)",
                "preprocess": {"interpolation": "bicubic", **asdict(self.preprocess)}}

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        images, out = list(images), []
        dtype = next(self.model.parameters()).dtype
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(load_rgb(im)) for im in images[i:i + self.batch_size]])
            hidden = self.model(pixel_values=pixels.to(self.device, dtype), **self._kwargs).last_hidden_state
            out.append(hidden[:, 0].float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()


class ClipImageEncoder:
    """CLIP-I: the image tower of a `CLIPScorer`, with its model's own preprocessing."""

    def __init__(self, scorer: CLIPScorer):
        self.scorer = scorer

    def describe(self) -> dict:
        d = self.scorer.describe()
        return {"encoder": "clip-i", "backend": d["backend"], "model": d["model"], "preprocess": "the CLIP model's own"}

    def image_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return self.scorer.image_embeddings(images)


class ImageSimilarity:
    """Cosine similarity between images and references under one encoder (`ClipImageEncoder` or `DinoEncoder`)."""

    def __init__(self, encoder: ImageEncoder):
        self.encoder = encoder

    def describe(self) -> dict:
        return self.encoder.describe()

    def matrix(self, images: Sequence[ImageLike], references: Sequence[ImageLike]) -> torch.Tensor:
        """(len(images), len(references)) cosines."""
        if not images or not references:
            raise EvaluationError("image similarity needs at least one image and one reference")
        return self.encoder.image_embeddings(images) @ self.encoder.image_embeddings(references).T

    def fidelity(self, images: Sequence[ImageLike], references: Sequence[ImageLike]) -> list[float]:
        """Per image, the mean cosine to all references (the DreamBooth / K-LoRA convention)."""
        return self.matrix(images, references).mean(dim=1).tolist()
