"""The write policy: the one way loraloom writes a file.

Every file loraloom writes — generated PNGs, merged LoRAs, coefficient files, masks, caches, reports, uploads —
goes through `write_file`, which

- confines it: a relative path lands in the policy's `root` (the run's output folder); an absolute one must lie
  inside `root` or one of the policy's `allowed` folders (loraloom's cache, a path the user typed on the command
  line of this very command), symlinks resolved; nothing is written in or under a `protected` path (model and
  LoRA files and folders), wherever it is;
- never replaces a file loraloom did not make (`loraloom_made`), nor anything that is not a regular file;
- writes atomically (a temporary file in the same folder, fsync, rename), so an interrupted write leaves the old
  file or none, and creates the file with the process umask (0644 by default), as `open()` would.

Paths that come from a PNG or from an API caller are data: they go through the same policy and a refusal names
them (`WriteRefused`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import LoraloomError, SpecError

TEMP_PREFIX = ".tmp-loraloom-"
_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")


class WriteRefused(LoraloomError, PermissionError):
    """A file loraloom will not write: outside the allowed folders, over a protected or foreign file."""


def _real(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _under(path: Path, folders: Iterable[Path]) -> bool:
    return any(path == f or path.is_relative_to(f) for f in folders)


@dataclass(frozen=True)
class WritePolicy:
    """Where one command or run may write: `root` (relative paths land there), `allowed` folders, never `protected`."""

    root: Path
    allowed: tuple[Path, ...] = ()
    protected: tuple[Path, ...] = field(default=())

    @staticmethod
    def at(root: str | os.PathLike, allowed: Iterable[str | os.PathLike] = (), protected: Iterable[str | os.PathLike] = ()) -> WritePolicy:
        return WritePolicy(_real(root), tuple(_real(a) for a in allowed), tuple(_real(p) for p in protected))

    def allowing(self, *paths: str | os.PathLike) -> WritePolicy:
        return WritePolicy(self.root, (*self.allowed, *(_real(p) for p in paths)), self.protected)

    def protecting(self, *paths: str | os.PathLike | None) -> WritePolicy:
        return WritePolicy(self.root, self.allowed, (*self.protected, *(_real(p) for p in paths if p)))

    def resolve(self, path: str | os.PathLike, what: str = "file") -> Path:
        """The real path `path` names under this policy, or `WriteRefused` saying why and where writes may go."""
        text = str(path)
        if not text.strip():
            raise WriteRefused(f"no {what} path given.")
        p = Path(text).expanduser()
        if ".." in p.parts:
            raise WriteRefused(f"{what} {text!r}: '..' is not allowed in a path loraloom writes. Fix: name a path inside {self.root}.")
        real = _real(p if p.is_absolute() else self.root / p)
        if not _under(real, (self.root, *self.allowed)):
            where = ", ".join(str(f) for f in (self.root, *self.allowed))
            raise WriteRefused(f"{what} {text!r} lies outside the folders this run may write ({where}). "
                               f"Fix: use a relative path (it lands in {self.root}) or a path inside those folders.")
        if _under(real, self.protected):
            raise WriteRefused(f"{what} {text!r} is (or lies in) a model or LoRA file or folder of this run ({real}); loraloom "
                               f"never writes there. Fix: use a relative path (it lands in {self.root}).")
        return real


def loraloom_made(path: str | os.PathLike) -> bool:
    """True when `path` is a file loraloom wrote: a PNG with a `loraloom` chunk, a safetensors file whose header
    names loraloom, a JSON file with a loraloom `format`/`loraloom` key, or one of loraloom's temporary files."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.name.startswith(TEMP_PREFIX):
        return True
    suffix = p.suffix.lower()
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(p) as im:
                return "loraloom" in getattr(im, "text", {})
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
            return any(k.startswith("loraloom") for k in meta) or str(meta.get("format", "")).startswith("loraloom")
        if suffix == ".json":
            if p.stat().st_size > 64 << 20:
                return False
            data = json.loads(p.read_text(encoding="utf-8"))
            return isinstance(data, dict) and ("loraloom" in data or str(data.get("format", "")).startswith("loraloom"))
    except Exception:  # unreadable or not what its name says: not ours
        return False
    return False


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_file(path: str | os.PathLike, write: Callable[[Path], None], policy: WritePolicy, *, what: str = "file",
               replace: bool | Callable[[Path], bool] = loraloom_made) -> Path:
    """Write one file under `policy`: `write(tmp_path)` writes the content to a temporary path, which then replaces
    the target atomically. An existing target is replaced only when `replace(target)` is true (default: loraloom
    made it; `False`: never). Returns the real path written."""
    target = policy.resolve(path, what)
    if target.exists() or target.is_symlink():
        if not target.is_file() or target.is_symlink():
            raise WriteRefused(f"{what} {target} exists and is not a regular file; loraloom does not write over it. Fix: choose another name.")
        if not (replace(target) if callable(replace) else replace):
            raise WriteRefused(f"{what} {target} exists and was not made by loraloom; it is left as it is. "
                               "Fix: choose another name, or move the file away.")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_text(path: str | os.PathLike, text: str, policy: WritePolicy, *, what: str = "file",
               replace: bool | Callable[[Path], bool] = loraloom_made) -> Path:
    """`write_file` for text (UTF-8)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), policy, what=what, replace=replace)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete loraloom's temporary files in `folder` that an interrupted process left (its pid no longer runs)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(TEMP_PREFIX + "*"):
        m = _TEMP.match(p.name)
        if m and not _pid_alive(int(m.group(1))) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- reading the small text files users write (specs, manifests, sidecars) ------------------------------------------
MAX_TEXT_BYTES = 4 << 20  # a spec, manifest or sidecar is kilobytes; anything this large is not one


def read_text_file(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file, or `SpecError` naming the problem: missing, not a regular file (a FIFO would
    block), larger than `max_bytes`, or not UTF-8."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"{p}: no such {what}.")
    if not p.is_file():
        raise SpecError(f"{p}: is not a regular file (a folder, pipe or device); give a {what} path.")
    size = p.stat().st_size
    if size > max_bytes:
        raise SpecError(f"{p}: {size} bytes is too large for a {what} (at most {max_bytes}).")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{p}: is not UTF-8 text ({err.reason} at byte {err.start}); save the {what} as UTF-8.") from None


MAX_YAML_NODES = 1_000_000  # nodes a document may expand to once aliases are followed


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document which, with its aliases (`*name`) followed, has more than
    `MAX_YAML_NODES` nodes: a "billion laughs" of a few hundred bytes expands into gigabytes in whatever walks
    it, while the few aliases a generated file may hold (PyYAML writes one per shared object) stay fine."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            size: dict[int, int] = {}
            self._expanded(node, size)
        return node

    def _expanded(self, node, size: dict[int, int]) -> int:
        if id(node) in size:
            return size[id(node)]
        size[id(node)] = 0  # a cycle counts once
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        total = 1 + sum(self._expanded(child, size) for child in children)
        if total > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"the document expands to more than {MAX_YAML_NODES} nodes "
                                              "through its aliases (*name)", node.start_mark)
        size[id(node)] = total
        return total


def read_yaml_file(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_TEXT_BYTES):
    """YAML (or JSON) from a small text file (`read_text_file`), parsed by `BoundedLoader`. Errors are `SpecError`
    on one line."""
    text = read_text_file(path, what, max_bytes)
    try:
        return yaml.load(text, Loader=BoundedLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SpecError(f"{path}: not valid YAML/JSON ({getattr(err, 'problem', None) or err}{where}).") from None
