"""Model families, one module each (`sd.py`: SD 1.x/2.x/XL, `flux.py`: FLUX.1, `sd3.py`: SD 3/3.5), behind the
`Family` protocol of `base.py`. `family_for(pipe)` picks the one for a loaded diffusers pipeline."""

from __future__ import annotations

from .base import Family
from .flux import FluxFamily
from .sd import SDFamily, sd_family_name
from .sd3 import SD3Family

# diffusers pipeline class -> family class (what `loading.py` accepts from a folder's model_index.json)
PIPELINE_FAMILIES = {"StableDiffusionPipeline": SDFamily, "StableDiffusionXLPipeline": SDFamily,
                     "FluxPipeline": FluxFamily, "StableDiffusion3Pipeline": SD3Family}
# family name -> the diffusers pipeline class name that loads it
FAMILY_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}


def family_for(pipe, name: str | None = None) -> Family:
    """The family of a loaded pipeline (by its class, else by its components)."""
    cls = PIPELINE_FAMILIES.get(type(pipe).__name__)
    if cls is None:
        if getattr(pipe, "transformer", None) is not None:
            cls = SD3Family if getattr(pipe, "text_encoder_3", None) is not None or hasattr(pipe, "tokenizer_3") else FluxFamily
        else:
            cls = SDFamily
    return cls(pipe, name)


def folder_geometry(folder) -> tuple[int, int] | None:
    """(default image side, the multiple sides must be) of a diffusers folder, from its configs alone (no weights
    loaded): the family comes from `model_index.json`'s pipeline class. None when that cannot be read."""
    import json
    from pathlib import Path

    index = Path(folder) / "model_index.json"
    try:
        cls = PIPELINE_FAMILIES.get(json.loads(index.read_text(encoding="utf-8")).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None
    return cls.config_geometry(folder) if cls is not None else None


def pipeline_family(pipe) -> str:
    """'sd1', 'sd2', 'sdxl', 'flux' or 'sd3' from the loaded pipeline."""
    return family_for(pipe).name


__all__ = ["FAMILY_PIPELINES", "PIPELINE_FAMILIES", "Family", "FluxFamily", "SD3Family", "SDFamily", "family_for", "folder_geometry",
           "pipeline_family", "sd_family_name"]
