"""What every judge is: `complete(request) -> str` (raising `JudgeError` once its retries are spent), plus the
identity and decoding parameters that go into cache keys. `ask` puts the cache in front of a judge."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from loraloom.evaluation.cache import JudgeCache, request_key
from loraloom.evaluation.errors import JudgeError
from loraloom.evaluation.images import ImageBlob, ImageLike
from loraloom.evaluation.prompts import PromptTemplate, sha256_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeRequest:
    """One question: a prompt rendered from a template, and images in the order the prompt names them."""

    prompt: str
    images: tuple[ImageBlob, ...]
    template: str  # "name@version"
    layout: str = "text_then_images"

    @staticmethod
    def build(template: PromptTemplate, images: Sequence[ImageLike | ImageBlob], **fields: str) -> JudgeRequest:
        return JudgeRequest(prompt=template.render(**fields), images=tuple(ImageBlob.of(im) for im in images),
                            template=template.id, layout=template.layout)


class Judge(Protocol):
    backend: str  # "openai" | "transformers"
    model: str
    requests_sent: int  # requests that reached the backend (retries included)

    def decoding(self) -> dict:
        """Everything besides the model and the request that changes the answer (temperature, max tokens …)."""

    def complete(self, request: JudgeRequest) -> str:
        """The judge's raw answer text; `JudgeError` after bounded retries."""


@dataclass(frozen=True)
class Answer:
    """A judge's answer to one request, or why there is none."""

    key: str
    text: str | None
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def ask(judge: Judge, request: JudgeRequest, cache: JudgeCache | None = None, sample: int = 0) -> Answer:
    """The cached answer if there is one; otherwise ask the judge and record what happened (answer or error)."""
    key = request_key(backend=judge.backend, model=judge.model, decoding=judge.decoding(), template=request.template,
                      prompt_sha256=sha256_text(request.prompt), image_sha256=[im.sha256 for im in request.images],
                      sample=sample)
    if cache is not None and (hit := cache.get(key)) is not None:
        return Answer(key=key, text=hit["text"], cached=True)
    t0 = time.monotonic()
    try:
        text, error, attempts = judge.complete(request), None, 0
    except JudgeError as err:
        text, error, attempts = None, str(err), err.attempts
        log.warning("judge %s failed on %s (%s)", judge.model, request.template, error)
    elapsed = round(time.monotonic() - t0, 3)
    if cache is not None:
        cache.put({"key": key, "status": "answer" if error is None else "error", "backend": judge.backend,
                   "model": judge.model, "decoding": judge.decoding(), "template": request.template,
                   "prompt_sha256": sha256_text(request.prompt), "images": [im.sha256 for im in request.images],
                   "sample": sample, "text": text, "error": error, "elapsed_s": elapsed})
    return Answer(key=key, text=text, error=error, attempts=attempts, elapsed_s=elapsed)
