"""Where the shipped files are, in a source tree and in an installed wheel alike (`importlib.resources`)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def assets_dir() -> Path:
    """The `assets/` folder (installed as the data package `loraloom.assets`)."""
    return Path(str(files("loraloom.assets")))


def asset(*parts: str) -> Path:
    """A shipped file or folder, e.g. `asset("toyworld", "model")`, `asset("examples", "toyworld.yaml")`."""
    return assets_dir().joinpath(*parts)
