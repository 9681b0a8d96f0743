"""MLLM judges: an OpenAI-compatible chat API (`OpenAIChatJudge`) or a local transformers VLM
(`TransformersVLMJudge`), behind one small interface (`Judge`), with `ask` putting the disk cache in front."""

from loraloom.evaluation.judges.base import Answer, Judge, JudgeRequest, ask

__all__ = ["Answer", "Judge", "JudgeRequest", "ask", "OpenAIChatJudge", "TransformersVLMJudge"]


def __getattr__(name):  # the backends import httpx / transformers: only when asked for
    if name == "OpenAIChatJudge":
        from loraloom.evaluation.judges.openai_chat import OpenAIChatJudge

        return OpenAIChatJudge
    if name == "TransformersVLMJudge":
        from loraloom.evaluation.judges.local_vlm import TransformersVLMJudge

        return TransformersVLMJudge
    raise AttributeError(name)
