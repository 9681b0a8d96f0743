"""A judge that is a local transformers vision-language model (`AutoModelForImageTextToText` + `AutoProcessor`):
a Qwen2-VL / Qwen2.5-VL, LLaVA, LLaVA-OneVision, Idefics … folder or a hub id already in the local cache.

The prompt and images go through the processor's chat template as one user turn; only the newly generated
tokens are decoded. Greedy decoding by default (LoRA.rar judged with greedy LLaVA-Critic).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loraloom.evaluation.clipscore import hub_offline, locate_model, resolve_device
from loraloom.evaluation.errors import EvaluationError, JudgeError
from loraloom.evaluation.judges.base import JudgeRequest

log = logging.getLogger(__name__)


class TransformersVLMJudge:
    backend = "transformers"

    def __init__(self, path_or_id: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                 max_new_tokens: int = 512, do_sample: bool = False, temperature: float | None = None, seed: int = 0,
                 image_max_side: int | None = None, local_files_only: bool = True):
        fix = ("pass --judge-model with a local folder holding the model and its processor, or --allow-download to "
               "fetch it once (library: local_files_only=False)")
        where = locate_model(path_or_id, "vision-language model", fix, local_files_only)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = str(path_or_id)
        self.device = resolve_device(device)
        try:
            with hub_offline(local_files_only):
                self.processor = AutoProcessor.from_pretrained(path_or_id, local_files_only=local_files_only)
                self.vlm = AutoModelForImageTextToText.from_pretrained(path_or_id, local_files_only=local_files_only,
                                                                       dtype=dtype).to(self.device).eval()
        except Exception as err:  # OSError, ValueError, a corrupt weights file …: one line, never a traceback
            raise EvaluationError(f"vision-language model ({where}) {self.model!r} cannot be loaded "
                                  f"({' '.join(str(err).split())}). Fix: {fix}.") from None
        if getattr(self.processor, "chat_template", None) is None:
            raise EvaluationError(f"{self.model}: its processor has no chat template; judges need one")
        self.max_new_tokens, self.do_sample, self.temperature, self.seed = max_new_tokens, do_sample, temperature, seed
        self.image_max_side = image_max_side
        self.requests_sent = 0

    def decoding(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature,
                "seed": self.seed, "image_max_side": self.image_max_side, "dtype": str(next(self.vlm.parameters()).dtype)}

    def complete(self, request: JudgeRequest) -> str:
        images = [{"type": "image", "image": b.pixels(self.image_max_side)} for b in request.images]
        text = [{"type": "text", "text": request.prompt}]
        content = text + images if request.layout == "text_then_images" else images + text
        self.requests_sent += 1
        try:
            inputs = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                        tokenize=True, return_dict=True, return_tensors="pt").to(self.device)
            kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
            if self.do_sample:
                torch.manual_seed(self.seed)
                if self.temperature is not None:
                    kwargs["temperature"] = self.temperature
            with torch.inference_mode():
                out = self.vlm.generate(**inputs, **kwargs)
            new = out[:, inputs["input_ids"].shape[1]:]
            return self.processor.batch_decode(new, skip_special_tokens=True)[0].strip()
        except (RuntimeError, ValueError, TypeError) as err:  # OOM, bad template, too many images for the model …
            raise JudgeError(f"{self.model} failed to answer: {type(err).__name__}: {err}") from None
