"""Judge prompts as versioned template files (`evaluation/templates/<name>.yaml`), never strings buried in code.

A template file holds `name`, `version`, `layout` (where the images go), `fields` (the `$placeholders` it needs)
and `text`. Editing the text means bumping `version`: judge cache keys include `name@version` (and the sha256 of
the rendered prompt, so an edit without a bump still never reuses a stale answer).
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from loraloom.evaluation.errors import EvaluationError

TEMPLATE_DIR = Path(__file__).parent / "templates"
LAYOUTS = ("text_then_images", "images_then_text")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: int
    text: str
    fields: tuple[str, ...] = ()
    layout: str = "text_then_images"

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def render(self, **values: str) -> str:
        missing = set(self.fields) - set(values)
        extra = set(values) - set(self.fields)
        if missing or extra:
            raise EvaluationError(f"template {self.id}: expected fields {sorted(self.fields)}, got {sorted(values)}")
        return string.Template(self.text).substitute(values).strip()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@cache
def load_template(name_or_path: str) -> PromptTemplate:
    """A shipped template by name (`composlora_pairwise`) or a user's own YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TEMPLATE_DIR / f"{name_or_path}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError:
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))
        raise EvaluationError(f"prompt template {name_or_path!r} not found ({path}); shipped ones: {known}") from None
    except yaml.YAMLError as err:
        raise EvaluationError(f"{path}: not valid YAML ({err})") from None
    try:
        tpl = PromptTemplate(name=str(data["name"]), version=int(data["version"]), text=str(data["text"]),
                             fields=tuple(data.get("fields") or ()), layout=str(data.get("layout", "text_then_images")))
    except (KeyError, TypeError, ValueError) as err:
        raise EvaluationError(f"{path}: a prompt template needs name, version (int) and text ({err!r})") from None
    if tpl.layout not in LAYOUTS:
        raise EvaluationError(f"{path}: layout must be one of {LAYOUTS}, not {tpl.layout!r}")
    placeholders = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(tpl.text)} - {None}
    if placeholders != set(tpl.fields):
        raise EvaluationError(f"{path}: text uses ${sorted(placeholders)} but fields lists {sorted(tpl.fields)}")
    return tpl
