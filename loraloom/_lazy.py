"""Package names imported on first use (PEP 562), so that `loraloom --help` or an error message does not wait for
torch and diffusers to import."""

from __future__ import annotations

import importlib


def lazy_exports(module_globals: dict, exports: dict[str, str]):
    """(`__getattr__`, `__dir__`) for a package whose public `exports` ({name: module, relative or absolute}) are
    imported when first used and then kept in the package's namespace."""
    package = module_globals["__name__"]

    def __getattr__(name: str):
        try:
            where = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(where, package), name)
        module_globals[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*module_globals, *exports})

    return __getattr__, __dir__
