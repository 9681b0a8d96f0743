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
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
CLIP_FIX = ("pass --clip with a local CLIP folder (e.g. assets/toyworld/clip), or --allow-download to fetch it once "
            "(library: local_files_only=False)")

# --- local files only -------------------------------------------------------------------------------------------
# loraloom never downloads by default. `local_files_only=True` alone is not enough: transformers still sends HEAD
# requests for some side files (adapter_config.json) and huggingface_hub retries a failed one 5 times with backoff
# (about 30 s offline before the "not cached" error). So every model load that must stay local runs inside
# `hub_offline()`, and a hub id is looked up in the local cache before anything is loaded (`locate_model`).

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_offline_lock = threading.Lock()
_offline_depth = 0
_offline_saved: tuple = ()


def hub_cache_dir() -> str:
    """The local Hugging Face hub cache transformers and open_clip read (HF_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """Within it, huggingface_hub (hence transformers and open_clip) is in offline mode: a file is read from the
    local cache or its lookup fails at once, no request, no retry. `offline=False` changes nothing. Nested and
    threaded uses are counted: the previous mode comes back when the last one leaves."""
    global _offline_depth, _offline_saved
    if not offline:
        yield
        return
    from huggingface_hub import constants

    with _offline_lock:
        if _offline_depth == 0:
            _offline_saved = (constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
            constants.HF_HUB_OFFLINE = True
            os.environ["HF_HUB_OFFLINE"] = "1"
        _offline_depth += 1
    try:
        yield
    finally:
        with _offline_lock:
            _offline_depth -= 1
            if _offline_depth == 0:
                constants.HF_HUB_OFFLINE, env = _offline_saved
                if env is None:
                    os.environ.pop("HF_HUB_OFFLINE", None)
                else:
                    os.environ["HF_HUB_OFFLINE"] = env


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


def hub_file_cached(repo_id: str, filename: str, cache_dir: str | None = None) -> bool:
    """Whether `filename` of hub model `repo_id` is in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str)
    except ValueError:  # not a valid repo id
        return False


def locate_model(path_or_id: str | os.PathLike, what: str, fix: str, local_files_only: bool = True) -> str:
    """Check, before anything loads, that a transformers model can be had: an existing folder, or a hub id (in the
    local cache unless `local_files_only` is False). Returns "folder" or "hub id"; raises one `EvaluationError`
    line naming what was looked for, where, and `fix` otherwise."""
    name = str(path_or_id)
    path = Path(name)
    if path.is_dir():
        return "folder"
    if path.exists():
        raise EvaluationError(f"{what} {name!r} is a file; a transformers model is a folder (config.json and weights). "
                              f"Fix: pass the folder that holds it, or {fix}.")
    if not _HUB_ID.match(name) or ".." in name:
        raise EvaluationError(f"{what} {name!r}: no such folder. Fix: check the path, or {fix}.")
    if local_files_only and not hub_file_cached(name, "config.json"):
        raise EvaluationError(f"{what} {name!r}: no folder of that name here, and not in the local Hugging Face cache "
                              f"({hub_cache_dir()}); loraloom does not download unless asked. Fix: {fix}.")
    return "hub id"


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


def open_clip_missing(model_name: str, pretrained: str | None, cache_dir: str | None = None) -> str | None:
    """What open_clip would have to download for `model_name` + `pretrained`, and where it looked; None when it
    has everything locally (a checkpoint file, a local-dir model, weights in the hub cache or open_clip's cache)."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    if model_name.startswith("local-dir:"):
        return None
    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:"):]
        if hub_file_cached(repo, "open_clip_config.json", cache_dir):
            return None
        return f"hub model {repo!r} is not in the local Hugging Face cache ({cache_dir or hub_cache_dir()})"
    if not pretrained or os.path.isfile(os.path.expanduser(pretrained)):
        return None
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        if os.sep in pretrained or "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            return f"no checkpoint file {pretrained!r}"
        return None  # an unknown tag: open_clip says so itself, without the network
    if "file" in cfg:
        return None
    if cfg.get("hf_hub") and oc_pretrained.has_hf_hub():
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or oc_pretrained.HF_WEIGHTS_NAME
        names = [filename, *oc_pretrained._get_safe_alternatives(filename)]
        if any(hub_file_cached(repo, f, cache_dir) for f in names):
            return None
        return (f"its weights (hub {repo!r}, {' or '.join(names)}) are not in the local Hugging Face cache "
                f"({cache_dir or hub_cache_dir()})")
    if cfg.get("url"):
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        return None if os.path.isfile(target) else f"its weights are not in open_clip's cache ({target})"
    return None


class OpenCLIPEmbedder:
    """open_clip model: `model_name` is an open_clip architecture ("ViT-B-16"), "hf-hub:org/repo" or
    "local-dir:/path"; `pretrained` is a tag ("openai", "laion2b_s34b_b88k") or a local checkpoint file, or None
    for random weights (tests and speed measurements only)."""

    backend = "open_clip"

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | torch.device = "auto",
                 precision: str = "fp32", cache_dir: str | None = None, local_files_only: bool = True, fix: str = CLIP_FIX):
        try:
            import open_clip
        except ImportError as err:
            raise EvaluationError(f"the open_clip backend needs open_clip_torch ({err}); install loraloom[eval]") from None
        self.device = resolve_device(device)
        self.name = model_name if not pretrained else f"{model_name}@{pretrained}"
        if pretrained is None and ":" not in model_name:
            log.warning("open_clip %s has random weights (pretrained=None): its scores mean nothing", model_name)
        if local_files_only:
            missing = open_clip_missing(model_name, pretrained, cache_dir)
            if missing:
                raise EvaluationError(f"open_clip {self.name!r}: {missing}; loraloom does not download unless asked. "
                                      f"Fix: {fix}.")
        try:
            with hub_offline(local_files_only):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained, device=self.device, precision=precision, cache_dir=cache_dir)
                tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except (RuntimeError, OSError, ValueError) as err:
            raise EvaluationError(f"open_clip model {self.name!r} cannot be loaded: {_one_line(err)}. "
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
                 dtype: torch.dtype = torch.float32, fix: str = CLIP_FIX):
        where = locate_model(path_or_id, "CLIP", fix, local_files_only)
        from transformers import AutoModel, AutoProcessor

        self.device = resolve_device(device)
        self.name = str(path_or_id)
        try:
            with hub_offline(local_files_only):
                model = AutoModel.from_pretrained(path_or_id, local_files_only=local_files_only, dtype=dtype)
                processor = AutoProcessor.from_pretrained(path_or_id, local_files_only=local_files_only)
        except Exception as err:  # OSError, ValueError, a corrupt weights file …: one line, never a traceback
            hint = ("the folder must hold a CLIP model and its processor (save_pretrained of both)" if where == "folder"
                    else f"check the hub id, or {fix}")
            raise EvaluationError(f"CLIP {where} {self.name!r} cannot be loaded ({_one_line(err)}). Fix: {hint}.") from None
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
        return OpenCLIPEmbedder(name, pretrained or None, device=device, local_files_only=local_files_only)
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
    def from_open_clip(cls, model_name: str, pretrained: str | None, device: str | torch.device = "auto",
                       local_files_only: bool = True, **kw):
        """open_clip architecture + pretrained tag or checkpoint file (None: random weights, for speed tests only);
        weights from the local caches only unless `local_files_only=False`."""
        return cls(OpenCLIPEmbedder(model_name, pretrained, device=device, local_files_only=local_files_only), **kw)

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

