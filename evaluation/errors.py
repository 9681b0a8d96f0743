"""Errors raised by loraloom's evaluation: each names the model, file or server at fault and what to do."""

from __future__ import annotations

from loraloom.composition.errors import LoraloomError


class EvaluationError(LoraloomError, ValueError):
    """An evaluator cannot be built or used: a model that will not load, bad settings, unreadable images."""


class JudgeError(LoraloomError, RuntimeError):
    """A judge request failed for good (after its retries): the reason is recorded, the run goes on."""

    def __init__(self, message: str, attempts: int = 1, retryable: bool = False):
        self.attempts = attempts
        self.retryable = retryable
        super().__init__(message)
