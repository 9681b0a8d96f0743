"""A judge behind any OpenAI-compatible chat-completions API with image input: OpenAI, vLLM, Ollama, LM Studio …

One user message holds the prompt and the images as base64 data URLs (`{"type": "image_url", ...}`), as
ComposLoRA's GPT-4V evaluation sent them. The API key is read from an environment variable whose *name* is a
setting (`api_key_env`); the key itself is kept private: not in `repr`, logs, errors, cache lines or outputs
(anything the server echoes back is redacted too).

Faults: a timeout per request; connection errors, HTTP 408/409/429/5xx and malformed response bodies are retried
with exponential backoff (honouring `Retry-After`) up to `max_retries` times; other HTTP errors fail at once.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable

import httpx

from loraloom.evaluation.errors import EvaluationError, JudgeError
from loraloom.evaluation.judges.base import JudgeRequest

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class _Retry(Exception):
    """A failure worth another try (`retry_after`: the server's Retry-After, in seconds)."""

    retry_after: float | None = None


def check_base_url(url: str) -> None:
    """An http(s) URL with a host, or one `EvaluationError` line with the fix (before any request is sent)."""
    example = ("Fix: pass --base-url like https://api.openai.com/v1, http://localhost:8000/v1 (vLLM) or "
               "http://localhost:11434/v1 (Ollama).")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as err:
        raise EvaluationError(f"judge base URL {url!r} is not a URL ({' '.join(str(err).split())}). {example}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host or any(c.isspace() for c in url):
        raise EvaluationError(f"judge base URL {url!r} is not an http(s) URL with a host. {example}")


class OpenAIChatJudge:
    backend = "openai"

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key_env: str | None = "OPENAI_API_KEY",
                 temperature: float | None = 1.0, max_tokens: int | None = 2048, seed: int | None = None,
                 json_mode: bool = False, image_max_side: int | None = None, timeout: float = 120.0,
                 max_retries: int = 3, backoff: float = 2.0, backoff_max: float = 60.0, extra_body: dict | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if max_retries < 0 or timeout <= 0:
            raise EvaluationError(f"judge needs max_retries >= 0 and timeout > 0 (got {max_retries}, {timeout})")
        check_base_url(base_url)
        self.model, self.base_url = model, base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.__key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not self.__key:
            log.info("no API key in $%s; requests go without Authorization (fine for local vLLM/Ollama)", api_key_env)
        self.temperature, self.max_tokens, self.seed, self.json_mode = temperature, max_tokens, seed, json_mode
        self.image_max_side, self.extra_body = image_max_side, dict(extra_body or {})
        self.timeout, self.max_retries, self.backoff, self.backoff_max, self._sleep = timeout, max_retries, backoff, backoff_max, sleep
        headers = {"Authorization": f"Bearer {self.__key}"} if self.__key else {}
        self._client = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers)
        self.requests_sent = 0
        self._count_lock = threading.Lock()  # one judge may serve several worker threads

    def __repr__(self) -> str:
        return f"OpenAIChatJudge(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def decoding(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed,
                "json_mode": self.json_mode, "image_max_side": self.image_max_side, "extra_body": self.extra_body}

    def _redact(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key and text else text

    def payload(self, request: JudgeRequest) -> dict:
        parts = [{"type": "image_url", "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(im.clean_png(self.image_max_side)).decode()}}
                 for im in request.images]
        text = [{"type": "text", "text": request.prompt}]
        content = text + parts if request.layout == "text_then_images" else parts + text
        body = {"model": self.model, "messages": [{"role": "user", "content": content}]}
        for name in ("temperature", "max_tokens", "seed"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        return {**body, **self.extra_body}

    def complete(self, request: JudgeRequest) -> str:
        body = self.payload(request)
        url = f"{self.base_url}/chat/completions"
        last = "no attempt made"
        for attempt in range(1, self.max_retries + 2):
            try:
                return self._redact(self._post(url, body))
            except _Retry as err:
                last = self._redact(str(err))
                if attempt > self.max_retries:
                    break
                delay = min(self.backoff * 2 ** (attempt - 1), self.backoff_max)
                if err.retry_after is not None:
                    delay = min(max(delay, err.retry_after), self.backoff_max)
                log.info("judge %s: %s; retry %d/%d in %.1f s", self.model, last, attempt, self.max_retries, delay)
                self._sleep(delay)
            except JudgeError as err:
                raise JudgeError(self._redact(str(err)), attempts=attempt) from None
        raise JudgeError(f"{last} (gave up after {self.max_retries + 1} attempts)", attempts=self.max_retries + 1, retryable=True)

    def _post(self, url: str, body: dict) -> str:
        with self._count_lock:
            self.requests_sent += 1
        try:
            resp = self._client.post(url, json=body)
        except httpx.TimeoutException:
            raise _Retry(f"timed out after {self.timeout:g} s") from None
        except httpx.TransportError as err:
            raise _Retry(f"cannot reach {self.base_url} ({type(err).__name__}: {err})") from None
        if resp.status_code != 200:
            detail = f"HTTP {resp.status_code} from {url}: {resp.text[:300]!r}"
            if resp.status_code in RETRY_STATUS:
                retry = _Retry(detail)
                try:
                    retry.retry_after = float(resp.headers["retry-after"])
                except (KeyError, ValueError):
                    pass
                raise retry
            hint = f" Fix: set ${self.api_key_env} to a valid key." if resp.status_code in (401, 403) else ""
            raise JudgeError(detail + hint)
        try:
            data = resp.json()
            content = data["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, ValueError, KeyError, IndexError, TypeError):
            raise _Retry(f"malformed response from {url}: {resp.text[:200]!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise _Retry(f"response from {url} has no text content")
        return content
