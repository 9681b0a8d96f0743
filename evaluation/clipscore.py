"""CLIPScore: how well an image matches a text, from the cosine of their CLIP embeddings.

    CLIPScore(I, C) = w · max(cos(E_I, E_C), 0)

with w = 100 (torchmetrics' `clip_score`, used by ComposLoRA and CMLoRA with ViT-B/16; range 0–100, our default)
or w = 2.5 (Hessel et al. 2021, "CLIPScore", eq. 1). A number means nothing without the backbone, the scale and
the text; `CLIPScorer.describe()` returns all three for the files a score is written to.

Two backends give the embeddings: open_clip (architecture name + pretrained tag or local checkpoint file) and
transformers (`CLIPModel` + `CLIPProcessor` from a local folder or a hub id). Each uses its model's own
preprocessing (resize + centre crop to the model's input size, the model's normalisation).

Texts longer than the model's context (77 tokens for CLIP) are never cut without a word: with
`long_text="truncate"` they are cut the way CLIP's tokenizers do it (first tokens kept, end-of-text token kept
last), a warning is logged and the result says `truncated=True`; with `long_text="error"` they raise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loraloom.evaluation.errors import EvaluationError
from loraloom.evaluation.images import ImageLike, load_rgb

log = logging.getLogger(__name__)

TORCHMETRICS_SCALE = 100.0
HESSEL_SCALE = 2.5
DEFAULT_CLIP = "openai/clip-vit-base-patch16"  # ComposLoRA's backbone (torchmetrics, ViT-B/16)
LONG_TEXT_MODES = ("truncate", "error")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from `get_*_features` (projected embedding in `pooler_output`); 4.x a tensor."""
    if torch.is_tensor(out):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise EvaluationError(f"the CLIP model returned {type(out).__name__} without pooler_output; is it a CLIP model?")
    return pooled


@dataclass(frozen=True)
class TextImageScore:
    """One image–text score, with what went into it."""

    score: float  # scale · max(cos, 0)
    cosine: float  # raw cosine, unclamped
    text_tokens: int  # tokens of the text, start and end tokens included, before any truncation
    truncated: bool  # the text was longer than the model's context and was cut


class OpenCLIPEmbedder:
    """open_clip model: `model_name` is an open_clip architecture ("ViT-B-16"), "hf-hub:org/repo" or
    "local-dir:/path"; `pretrained` is a tag ("openai", "laion2b_s34b_b88k") or a local checkpoint file, or None
    for random weights (tests and speed measurements only)."""

    backend = "open_clip"

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | torch.device = "auto",
                 precision: str = "fp32", cache_dir: str | None = None):
        try:
            import open_clip
        except ImportError as err:
            raise EvaluationError(f"the open_clip backend needs open_clip_torch ({err}); install loraloom[eval]") from None
        self.device = resolve_device(device)
        self.name = model_name if not pretrained else f"{model_name}@{pretrained}"
        if pretrained is None and ":" not in model_name:
            log.warning("open_clip %s has random weights (pretrained=None): its scores mean nothing", model_name)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=self.device, precision=precision, cache_dir=cache_dir)
            tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except (RuntimeError, OSError, ValueError) as err:
            raise EvaluationError(f"open_clip model {self.name!r} cannot be loaded: {err}. "
                                  "Fix: check the name against open_clip.list_models() and the tag or file path.") from None
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.context_length = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))

    def token_count(self, text: str) -> int:
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # SimpleTokenizer (CLIP BPE)
            return len(tok.encode(text)) + 2
        inner = getattr(tok, "tokenizer", None)  # HFTokenizer (SigLIP, mT5 …): specials included by the tokenizer
        if inner is not None:
            return len(inner(tok.clean_fn(text) if hasattr(tok, "clean_fn") else text)["input_ids"])
        return int((tok([text], context_length=10_000) != 0).sum())

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(load_rgb(im)) for im in images]).to(self.device)
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(pixels.to(dtype)).float()

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        # the tokenizer cuts over-long texts to the context, end-of-text token last (CLIP's own rule)
        ids = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(ids).float()


class TransformersCLIPEmbedder:
    """transformers CLIP: a local folder saved with `save_pretrained` (model + processor) or a hub id.
    `local_files_only=True` (the default) never touches the network: hub ids must already be in the local cache."""

    backend = "transformers"

    def __init__(self, path_or_id: str | Path, device: str | torch.device = "auto", local_files_only: bool = True,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModel, AutoProcessor

        self.device = resolve_device(device)
        self.name = str(path_or_id)
        where = "folder" if Path(path_or_id).exists() else "hub id"
        try:
            model = AutoModel.from_pretrained(path_or_id, local_files_only=local_files_only, dtype=dtype)
            processor = AutoProcessor.from_pretrained(path_or_id, local_files_only=local_files_only)
        except (OSError, ValueError) as err:
            hint = (f"it is not in the local Hugging Face cache; download it once (hf download {path_or_id}) "
                    "or pass a local folder (the toy world ships one: assets/toyworld/clip)"
                    if where == "hub id" and local_files_only
                    else "the folder must hold a CLIP model and its processor (save_pretrained of both)")
            raise EvaluationError(f"CLIP {where} {str(path_or_id)!r} cannot be loaded ({err}). Fix: {hint}.") from None
        self._setup(model, processor)

    @classmethod
    def from_components(cls, model, processor, name: str = "in-memory", device: str | torch.device = "auto"):
        """From an already built `CLIPModel` and `CLIPProcessor` (tests, the toy world)."""
        self = cls.__new__(cls)
        self.device, self.name = resolve_device(device), name
        self._setup(model, processor)
        return self

    def _setup(self, model, processor) -> None:
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise EvaluationError(f"{self.name}: {type(model).__name__} is not a CLIP-style model "
                                  "(no get_image_features/get_text_features)")
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.context_length = int(model.config.text_config.max_position_embeddings)

    def token_count(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        pixels = self.processor.image_processor(images=[load_rgb(im) for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        return _features(self.model.get_image_features(pixel_values=pixels)).float()

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        # truncation=True keeps the end-of-text token last, which CLIP pools from (cutting ids by hand would lose it)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt")
        return _features(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                      attention_mask=enc["attention_mask"].to(self.device))).float()


def load_clip_embedder(spec: str, device: str | torch.device = "auto", local_files_only: bool = True):
    """A CLIP embedder from a one-string spec, as the command line takes it:

    - `open_clip:ViT-B-16@openai`, `open_clip:ViT-B-16@/path/ckpt.pt`, `open_clip:hf-hub:org/repo`;
    - `transformers:PATH_OR_ID`, or just a local folder or a hub id (`openai/clip-vit-base-patch16`).
    """
    if spec.startswith("open_clip:"):
        name, _, pretrained = spec[len("open_clip:"):].partition("@")
        if not pretrained and not name.startswith(("hf-hub:", "local-dir:")):
            raise EvaluationError(f"CLIP spec {spec!r} names no weights. Fix: add @TAG or @/path/to/checkpoint "
                                  "(e.g. open_clip:ViT-B-16@openai).")
        return OpenCLIPEmbedder(name, pretrained or None, device=device)
    if spec.startswith("transformers:"):
        spec = spec[len("transformers:"):]
    return TransformersCLIPEmbedder(spec, device=device, local_files_only=local_files_only)


class CLIPScorer:
    """CLIPScore for (image, text) pairs, batched. Build once, call `score` many times.

    `embedder` is an `OpenCLIPEmbedder` or `TransformersCLIPEmbedder`; `scale` is 100 (torchmetrics, default)
    or 2.5 (Hessel et al.); `long_text` is "truncate" (warn and flag) or "error".
    """

    def __init__(self, embedder, scale: float = TORCHMETRICS_SCALE, batch_size: int = 16, long_text: str = "truncate"):
        if long_text not in LONG_TEXT_MODES:
            raise EvaluationError(f"long_text must be one of {LONG_TEXT_MODES}, not {long_text!r}")
        if not scale > 0:
            raise EvaluationError(f"the CLIPScore scale must be positive, not {scale}")
        self.embedder, self.scale, self.batch_size, self.long_text = embedder, float(scale), int(batch_size), long_text

    @classmethod
    def load(cls, spec: str = DEFAULT_CLIP, device: str | torch.device = "auto", local_files_only: bool = True, **kw):
        """From a one-string model spec (see `load_clip_embedder`)."""
        return cls(load_clip_embedder(spec, device=device, local_files_only=local_files_only), **kw)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None, device: str | torch.device = "auto", **kw):
        """open_clip architecture + pretrained tag or checkpoint file (None: random weights, for speed tests only)."""
        return cls(OpenCLIPEmbedder(model_name, pretrained, device=device), **kw)

    @classmethod
    def from_transformers(cls, path_or_id: str | Path, device: str | torch.device = "auto", local_files_only: bool = True, **kw):
        """A transformers CLIP folder (e.g. assets/toyworld/clip) or a hub id (local cache only by default)."""
        return cls(TransformersCLIPEmbedder(path_or_id, device=device, local_files_only=local_files_only), **kw)

    def describe(self) -> dict:
        """What a reader needs to compare this score with another: backend, model, scale, clamp, context."""
        return {"backend": self.embedder.backend, "model": self.embedder.name, "scale": self.scale, "clamp": "max(cos,0)",
                "context_length": self.embedder.context_length, "long_text": self.long_text}

    def score(self, images: Sequence[ImageLike], texts: Sequence[str]) -> list[float]:
        """`scale · max(cos, 0)` per (image, text) pair."""
        return [s.score for s in self.score_details(images, texts)]

    def score_details(self, images: Sequence[ImageLike], texts: Sequence[str]) -> list[TextImageScore]:
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise EvaluationError(f"CLIPScore needs one text per image: got {len(images)} images and {len(texts)} texts")
        counts = self._check_lengths(texts)
        out: list[TextImageScore] = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            cos = self._cosines(images[start:end], texts[start:end])
            for c, n in zip(cos.tolist(), counts[start:end]):
                out.append(TextImageScore(score=self.scale * max(c, 0.0), cosine=c, text_tokens=n,
                                          truncated=n > self.embedder.context_length))
        return out

    def image_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) on the CPU, batched: the CLIP-I encoder of `similarity`."""
        images = list(images)
        chunks = [self.embedder.image_embeddings(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()

    def _cosines(self, images, texts) -> torch.Tensor:
        img = torch.nn.functional.normalize(self.embedder.image_embeddings(images), dim=-1)
        txt = torch.nn.functional.normalize(self.embedder.text_embeddings(texts), dim=-1)
        cos = (img * txt).sum(-1).cpu()
        if not torch.isfinite(cos).all():
            raise EvaluationError(f"{self.embedder.name}: non-finite CLIP embeddings (NaN/inf); check the weights and dtype")
        return cos

    def _check_lengths(self, texts: list[str]) -> list[int]:
        ctx = self.embedder.context_length
        counts = [self.embedder.token_count(t) for t in texts]
        for text, n in zip(texts, counts):
            if n <= ctx:
                continue
            msg = (f"text of {n} tokens is longer than {self.embedder.name}'s {ctx}-token context: {text[:80]!r}…")
            if self.long_text == "error":
                raise EvaluationError(msg + " Fix: shorten it, score trigger words only, or pass long_text='truncate'.")
            log.warning("%s; only its first %d tokens are scored (the result is flagged truncated)", msg, ctx)
        return counts

