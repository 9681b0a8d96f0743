"""Errors raised by loraloom's core: each names the file (or key) at fault and what to do about it."""

from __future__ import annotations


class LoraloomError(Exception):
    """Base class for errors that carry a user-facing message."""


class LoRAFileError(LoraloomError, ValueError):
    """A LoRA file cannot be used: unreadable, not a LoRA, unsupported format, or wrong base model."""

    def __init__(self, path, problem: str, fix: str | None = None):
        self.path = str(path) if path is not None else None
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}" + (f" Fix: {fix}" if fix else ""))


class UnsupportedLoRAFormat(LoRAFileError):
    """LoHa, LoKr, DoRA, Tucker-decomposed LoCon and other non-LoRA adapter types."""


class IncompatibleLoRA(LoRAFileError):
    """The LoRA was made for another base model (family or layer shapes differ)."""


class AdapterNameError(LoraloomError, ValueError):
    """Duplicate or unknown adapter name."""


class GenerationError(LoraloomError, RuntimeError):
    """A generation that cannot give a valid image (e.g. its latents became NaN/Inf); nothing is saved."""


class MethodError(LoraloomError, ValueError):
    """A method cannot run as asked: a parameter out of its range, or a composition it has no meaning for."""


class SpecError(LoraloomError, ValueError):
    """A generation spec (YAML/JSON/PNG) is malformed."""
