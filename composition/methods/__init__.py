"""Composition methods, registered by name. Importing this package registers the built-in ones."""

from .base import (
    REGISTRY,
    ActiveLoRA,
    DenoiseContext,
    Method,
    Step,
    describe_params,
    get_method,
    make_method,
    params_to_dict,
    register,
)
from . import composite, merge, switch  # noqa: F401  (registration)
from . import clora, cmlora  # noqa: F401  (registration)
from . import hypernet, klora, ziplora  # noqa: F401  (registration)


def available_methods() -> list[str]:
    return sorted(REGISTRY)


__all__ = [
    "REGISTRY",
    "ActiveLoRA",
    "DenoiseContext",
    "Method",
    "Step",
    "available_methods",
    "describe_params",
    "get_method",
    "make_method",
    "params_to_dict",
    "register",
]
