"""Composition methods, registered by name. Importing this package registers the built-in ones."""

from . import clora, cmlora, composite, hypernet, klora, loratorio, merge, switch, tokenroute, ziplora  # noqa: F401  (registration)
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
    written_paths,
)


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
    "written_paths",
]
