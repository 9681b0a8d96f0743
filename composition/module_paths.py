"""Where a LoRA file's module path lands in the installed model: the one place naming variants are bridged.

transformers 4's `CLIPTextModel` wrapped its layers in a `text_model` module, so every LoRA trained under it
names text-encoder layers `text_model.encoder.layers.N.…` (kohya/sd-scripts and A1111: `lora_te_text_model_…`,
`lora_te1_text_model_…`; diffusers/PEFT: `text_encoder.text_model.…`). transformers 5 dropped that level from
`CLIPTextModel` but kept it in `CLIPTextModelWithProjection` (SDXL's second text encoder), so a file written
today may have either spelling, and the model may have either. diffusers' loader strips `text_model.` when the
model lacks it (`lora_base._load_lora_into_text_encoder`) but never adds it; here both directions are tried, so
a file loads whatever the trainer's and the installed transformers called the level.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

# Wrapper levels that one transformers version has and another has not (the path below them is the same).
OPTIONAL_LEVELS = ("text_model.",)


def path_variants(path: str) -> Iterator[str]:
    """`path` itself, then the same path with each optional wrapper level removed or added."""
    yield path
    for level in OPTIONAL_LEVELS:
        yield path[len(level):] if path.startswith(level) else level + path


def resolve_module_path(path: str, module_names: Collection[str]) -> str | None:
    """The model's name for the module a LoRA calls `path`, or None when the model has no such module."""
    return next((p for p in path_variants(path) if p in module_names), None)


def with_level(path: str, level: str = "text_model.") -> str:
    """`path` spelled with the wrapper level (as transformers 4, sd-scripts and A1111 name text-encoder layers)."""
    return path if path.startswith(level) else level + path
