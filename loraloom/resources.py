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


def shipped(name: str | Path) -> Path | None:
    """A shipped file named as in the repository or by example name, for use from any folder:
    `assets/examples/toyworld.yaml`, `examples/toyworld.yaml` or `toyworld` -> the installed copy; None if none."""
    parts = Path(name).parts
    if parts[:1] == ("assets",):
        parts = parts[1:]
    candidates = [asset(*parts)] if parts else []
    if len(parts) == 1:
        candidates += [asset("examples", parts[0]), asset("examples", parts[0] + ".yaml")]
    return next((c for c in candidates if c.is_file()), None)


def examples() -> list[str]:
    """Names of the shipped example spec files (`loraloom generate <name>`)."""
    return sorted(p.stem for p in asset("examples").glob("*.yaml"))
