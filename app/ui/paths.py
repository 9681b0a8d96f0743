"""Which files the web UI may touch: only those inside the configured model, LoRA and output folders.

A path is refused (with a message that names the folders allowed) when it has a `..` part, is absolute and
outside every allowed folder, or is a symlink (or lies under one) that points outside them. Checks run on the
resolved path, so a link inside a LoRA folder that points at /etc is caught.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from loraloom.composition.errors import LoraloomError


class PathRefused(LoraloomError, PermissionError):
    """A path the web UI will not read or write."""


def _roots(roots: Iterable[str | os.PathLike]) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in roots]


def is_inside(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> bool:
    """True when `path`, symlinks resolved, is one of `roots` or lies under one of them."""
    real = Path(path).expanduser().resolve()
    return any(real == r or real.is_relative_to(r) for r in _roots(roots))


def resolve_inside(path: str | os.PathLike, roots: Iterable[str | os.PathLike], what: str = "file") -> Path:
    """The resolved `path` if it lies inside one of `roots`; otherwise `PathRefused`.

    A relative path is taken relative to each root in turn (the first root that holds it wins).
    """
    roots = list(roots)
    text = str(path)
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    if not text.strip():
        raise PathRefused(f"no {what} path given.")
    p = Path(text).expanduser()
    if ".." in p.parts:
        raise PathRefused(f"{what} path {text!r} is refused: '..' is not allowed. Use a path inside {allowed}.")
    candidates = [p] if p.is_absolute() else [Path(r).expanduser().absolute() / p for r in roots]
    present = [c for c in candidates if c.exists() or c.is_symlink()]
    for candidate in present or candidates[:1]:
        if is_inside(candidate, roots):
            return candidate.resolve()
        lexical = [Path(r).expanduser().absolute() for r in roots]
        if any(candidate.absolute().is_relative_to(r) for r in lexical):
            raise PathRefused(f"{what} path {text!r} is refused: it is (or lies under) a symlink that points outside "
                              f"the allowed folders ({allowed}).")
    raise PathRefused(f"{what} path {text!r} is refused: it lies outside the allowed folders ({allowed}).")
