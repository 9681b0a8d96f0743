"""Method parameters as form fields, from `describe_params` alone: a method registered later gets its controls
with no change here. Each field says how to make its control and how to turn the control's value back into the
parameter's value (and the other way, to restore a PNG's settings)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from loraloom.composition.errors import SpecError
from loraloom.composition.methods import describe_params, get_method
from loraloom.composition.methods.base import NO_PATH

NUMBER_TYPES = {"int": int, "float": float}
# Text parameters that name files or folders, when the dataclass does not say so with `path=` metadata.
PATH_NAME = re.compile(r"(^save_|(^|_)(dir|path|file|folder|checkpoint|cache|coefficients)$)")
PATH_TOKENS = NO_PATH  # values such parameters use to mean "no file" (never taken as paths)


@dataclass(frozen=True)
class ParamField:
    method: str
    name: str
    kind: str  # bool | int | float | choice | str | json
    default: Any
    help: str
    optional: bool = False  # the parameter accepts None (an empty field)
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    path: bool = False  # the value names a file or folder the method reads or writes
    writes: bool = False  # ... and the method may write it (confined to the output folder by the write policy)

    @property
    def elem_id(self) -> str:
        return f"param-{self.method}-{self.name}"

    def to_control(self, value: Any) -> Any:
        """The control's value for parameter value `value`."""
        if self.kind == "json":
            return json.dumps(value)
        if self.kind == "str" and value is None:
            return ""
        return value

    def from_control(self, raw: Any) -> Any:
        """The parameter value from the control's value; `SpecError` (a ValueError) naming the method and field if
        it is not one."""
        where = f"{self.method}.{self.name}"
        if self.kind == "bool":
            return bool(raw)
        if self.kind in NUMBER_TYPES:
            if raw is None or raw == "":
                if self.optional:
                    return None
                raise SpecError(f"{where} needs a number")
            try:
                value = NUMBER_TYPES[self.kind](raw)
                whole = float(raw) == value
            except (TypeError, ValueError, OverflowError):
                raise SpecError(f"{where} must be a number, got {raw!r}") from None
            if self.kind == "int" and not whole:
                raise SpecError(f"{where} must be a whole number, got {raw}")
            self._check_range(value)
            return value
        if self.kind == "choice":
            if raw not in self.choices:
                raise SpecError(f"{where} must be one of {list(self.choices)}, got {raw!r}")
            return raw
        if self.kind == "json":
            if isinstance(raw, str):
                try:
                    return json.loads(raw) if raw.strip() else None
                except json.JSONDecodeError as err:
                    example = {"list": '["word, word", "word"]', "dict": '{"name": "word, word"}'}.get(
                        type(self.default).__name__, json.dumps(self.default))
                    raise SpecError(f"{where} is not valid JSON ({err.msg}): {raw.strip()[:80]!r}. Fix: write it as "
                                    f"JSON, e.g. {example} (the default is {json.dumps(self.default)})") from None
            return raw
        return None if (raw in (None, "") and self.optional) else str(raw or "")

    def _check_range(self, value) -> None:
        if self.minimum is not None and value < self.minimum or self.maximum is not None and value > self.maximum:
            low = "-inf" if self.minimum is None else f"{self.minimum:g}"
            high = "inf" if self.maximum is None else f"{self.maximum:g}"
            raise SpecError(f"{self.method}.{self.name} must lie in [{low}, {high}], got {value:g}. Fix: a value in "
                            "that range")


def _kind(type_text: str) -> tuple[str, bool]:
    """('int', optional?) from a dataclass field's type text such as 'int | None' or 'Optional[float]'."""
    text = str(type_text).replace(" ", "")
    optional = "None" in re.split(r"[|\[\],]", text) or text.startswith("Optional[")
    base = re.sub(r"^Optional\[(.*)\]$", r"\1", text)
    parts = [p for p in base.split("|") if p and p != "None"]
    if len(parts) == 1 and parts[0] in ("bool", "int", "float", "str"):
        return parts[0], optional
    return "json", optional


def method_fields(method: str) -> list[ParamField]:
    """The form fields of a registered method's parameter dataclass, in declaration order."""
    out = []
    for d in describe_params(get_method(method)):
        kind, optional = _kind(d["type"])
        if d.get("choices"):
            kind = "choice"
        is_path = bool(d["path"]) if "path" in d else (kind == "str" and bool(PATH_NAME.search(d["name"])))
        out.append(ParamField(method=method, name=d["name"], kind=kind, default=d["default"], help=d.get("help", ""),
                              optional=optional or d["default"] is None, minimum=d.get("min"), maximum=d.get("max"),
                              choices=tuple(d["choices"]) if d.get("choices") else None, path=is_path,
                              writes=bool(d.get("writes"))))
    return out


def path_values(method: str, params: dict) -> dict[str, tuple[str, bool]]:
    """The file/folder parameters of `params` that name a path (not empty, not 'off', not the method's default):
    {name: (value, whether the method may write it)}."""
    out = {}
    for f in method_fields(method):
        value = params.get(f.name)
        if f.path and isinstance(value, str) and value.strip().lower() not in PATH_TOKENS and value != f.default:
            out[f.name] = (value, f.writes)
    return out


# The parameters each method's paper tunes (at most four): shown in the method's panel; the others are under
# "advanced" (collapsed). A method not listed here (one registered later) shows its first parameters that are not
# files (at most four) as basic.
BASIC_PARAMS: dict[str, tuple[str, ...]] = {
    "merge": ("lora_scale",),
    "switch": ("switch_interval", "lora_scale", "order"),
    "composite": ("lora_scale",),
    "klora": ("alpha", "beta", "top_k", "time_pattern"),
    "ziplora": ("steps", "lam", "lr", "roles"),
    "clora": ("concepts", "lora_scale", "step_size", "temperature"),
    "cmlora": ("intervals", "late_phase_start", "cache_interval", "lora_scale"),
    "hypernet": ("lora_scale", "roles", "checkpoint"),
    "loratorio": ("patch_size", "temperature", "recenter", "top_k"),
    "tokenroute": ("concepts", "collect_fraction", "mask_mode", "lora_scale"),
}
MAX_BASIC = 4


def basic_fields(method: str, fields: list[ParamField]) -> set[str]:
    """The names of `method`'s basic parameters (see BASIC_PARAMS)."""
    names = [f.name for f in fields]
    if method in BASIC_PARAMS:
        return {n for n in BASIC_PARAMS[method] if n in names}
    return {f.name for f in fields if not f.path and f.kind != "json"}.intersection(
        [f.name for f in fields if not f.path][:MAX_BASIC])


_EMPHASIS_UNDERSCORE = re.compile(r"(?<!\w)_|_(?!\w)")


def plain_markdown(text: str) -> str:
    """`text` as Gradio's `info` line shows it as written. That line is rendered by a small Markdown renderer that
    knows no backslash escapes: `1.5 * 0.85` loses its `*` and `_x_` its underscores. So `*` becomes `∗` (U+2217,
    the same glyph) and an underscore at the edge of a word `ˍ` (U+02CD); underscores inside words (`lora_scale`)
    and backticks (code) stay."""
    return _EMPHASIS_UNDERSCORE.sub("\u02cd", (text or "").replace("*", "\u2217"))


def make_control(f: ParamField, value: Any = None):
    """The Gradio control of one field, showing `value` (default: the dataclass default) and the help text (shown
    as written). Numbers are number boxes without bounds: a value out of the field's range is refused by name when
    the form is read (`from_control`), never clamped by the page."""
    import gradio as gr

    value = f.default if value is None else value
    info = plain_markdown(f.help) if f.help else None
    if f.kind in NUMBER_TYPES and (f.minimum is not None or f.maximum is not None):
        low = "" if f.minimum is None else f"{f.minimum:g}"
        high = "" if f.maximum is None else f"{f.maximum:g}"
        info = (info + " " if info else "") + f"(range {low} to {high})".replace("range  to", "at most").replace(" to )", " or more)")
    common = dict(label=f.name, info=info, elem_id=f.elem_id)
    if f.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if f.kind == "choice":
        return gr.Dropdown(choices=list(f.choices), value=value, **common)
    if f.kind in NUMBER_TYPES:
        step = 1 if f.kind == "int" else 0.01
        return gr.Number(value=value, precision=0 if f.kind == "int" else None, step=step, **common)
    if f.kind == "json":
        return gr.Textbox(value=f.to_control(value), lines=1, **{**common, "label": f"{f.name} (JSON)"})
    return gr.Textbox(value=f.to_control(value), lines=1, **common)


def collect(fields: list[ParamField], raws: list[Any]) -> dict[str, dict]:
    """{method: {param: value}} from the controls' values (same order as `fields`)."""
    out: dict[str, dict] = {}
    for f, raw in zip(fields, raws, strict=True):
        out.setdefault(f.method, {})[f.name] = f.from_control(raw)
    return out


def control_values(fields: list[ParamField], params_by_method: dict[str, dict]) -> list[Any]:
    """Control values showing `params_by_method` (defaults for what it leaves out), in the order of `fields`."""
    return [f.to_control(params_by_method.get(f.method, {}).get(f.name, f.default)) for f in fields]
