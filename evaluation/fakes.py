"""Offline stand-ins for evaluation's models and servers: tiny random CLIP / DINOv2 / LLaVA built from config,
and a real OpenAI-compatible HTTP server on 127.0.0.1 whose answers (and faults) a test scripts.

Used by the tests, `benchmarks/bench_clipscore.py` and anyone who needs a judge or a CLIP without a download.
Their scores are meaningless; they exercise every code path in seconds.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

TINY_WORDS = ("cat", "dog", "red", "blue", "photo", "style", "watercolor", "girl", "castle")


def tiny_clip_folder(folder: str | Path, seed: int = 0, words=TINY_WORDS, image_size: int = 32) -> Path:
    """A random `CLIPModel` (hidden 32, 2 layers, 32 px, patch 8, projection 16) + `CLIPProcessor`, saved."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from loraloom.pipelines.tiny import write_clip_tokenizer_files

    folder = Path(folder)
    vocab, merges = write_clip_tokenizer_files(folder, list(words))
    tok = CLIPTokenizer(vocab=str(vocab), merges=str(merges), pad_token="<|endoftext|>", model_max_length=77)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tok)
    layers = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(**layers, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, max_position_embeddings=77),
        vision_config=dict(**layers, image_size=image_size, patch_size=8), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_open_clip(folder: str | Path, name: str = "loraloom-tiny-clip") -> str:
    """Registers a tiny open_clip architecture (CLIP BPE tokenizer, 32 px) under `name` and returns the name."""
    import open_clip

    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(path)
    return name


def tiny_dinov2(seed: int = 0, image_size: int = 32):
    """A random `Dinov2Model` (hidden 32, 2 layers, patch 8)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    image_size=image_size, patch_size=8))


LLAVA_WORDS = ("yes", "no", "<unk>", "<pad>", "<s>", "</s>", "<image>", "user", "assistant", ":", "image", "1", "2")
LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                  "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}assistant : {% endif %}")


def tiny_llava_folder(folder: str | Path, seed: int = 0, always_first_token: bool = False) -> Path:
    """A random LLaVA (CLIP vision 32 px + 2-layer Llama, word-level vocabulary) + `LlavaProcessor` with a chat
    template, saved. With `always_first_token`, the LM head is zero, so greedy decoding always picks token 0
    ("yes"): a deterministic answer through the real generate path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(LLAVA_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                       image_size=32, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                num_key_value_heads=4, num_hidden_layers=2, max_position_embeddings=512,
                                pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"]),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if always_first_token:
        with torch.no_grad():
            model.get_output_embeddings().weight.zero_()
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- a scripted OpenAI-compatible server


@dataclass
class Fault:
    """What the fake server does instead of answering: an HTTP status and body, after an optional delay."""

    status: int = 500
    body: str = '{"error": {"message": "internal error"}}'
    delay: float = 0.0
    headers: dict = field(default_factory=dict)


def images_in(body: dict) -> list[Image.Image]:
    """The images of a chat-completions request body, decoded from their data URLs."""
    out = []
    for message in body.get("messages", []):
        for part in message.get("content", []) if isinstance(message.get("content"), list) else []:
            if part.get("type") == "image_url":
                b64 = part["image_url"]["url"].split(",", 1)[1]
                out.append(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
    return out


def prompt_in(body: dict) -> str:
    return "\n".join(p.get("text", "") for m in body.get("messages", []) if isinstance(m.get("content"), list)
                     for p in m["content"] if p.get("type") == "text")


def completion(text: str, model: str = "fake") -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class FakeChatServer:
    """A real HTTP server on 127.0.0.1 speaking `POST /v1/chat/completions`. `respond(body, headers, n)` gets the
    request JSON, its headers and the 1-based request count, and returns the answer text or a `Fault`.
    Every request is recorded (`requests`: bodies, `headers`)."""

    def __init__(self, respond: Callable[[dict, dict, int], str | Fault]):
        self.respond = respond
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = {}
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    n = len(server.requests)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, '{"error": "not found"}')
                result = server.respond(body, dict(self.headers), n)
                if isinstance(result, Fault):
                    time.sleep(result.delay)
                    return self._send(result.status, result.body, result.headers)
                self._send(200, json.dumps(completion(result, body.get("model", "fake"))))

            def _send(self, status, text, headers=None):
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    data = text.encode()
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def brightness_judge(body: dict, headers: dict, n: int) -> str:
    """A scripted pairwise judge: the brighter image gets the higher composition score (so the same image wins in
    both orders), image quality 5 for both; answers in JSON."""
    imgs = images_in(body)
    means = [sum(im.convert("L").getdata()) / (im.width * im.height) for im in imgs]
    comp = [round(min(10.0, m / 25.5) * 2) / 2 for m in means]
    return json.dumps({"image_1": {"explanation": "first", "composition_quality": comp[0], "image_quality": 5},
                       "image_2": {"explanation": "second", "composition_quality": comp[1], "image_quality": 5}})
