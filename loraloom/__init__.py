"""loraloom: compose several LoRAs in one text-to-image diffusion generation.

The repository keeps its folders at the top level (`composition/`, `pipelines/`, `evaluation/`, `app/`,
`assets/`); they install as `loraloom.composition`, `loraloom.pipelines`, `loraloom.evaluation`, `loraloom.app`
and `loraloom.assets` (see `package-dir` in pyproject.toml). This module is the public API:

```py
from loraloom import ComposedPipeline
cp = ComposedPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", local_files_only=True)
cp.load_lora("character.safetensors"); cp.load_lora("style.safetensors")
image = cp("a portrait", loras=["character", "style"], method="composite", seed=0).images[0]
```
"""

from importlib.metadata import PackageNotFoundError, version

from ._lazy import lazy_exports
from .composition.errors import (
    AdapterNameError,
    GenerationError,
    IncompatibleLoRA,
    LoRAFileError,
    LoraloomError,
    SpecError,
    UnsupportedLoRAFormat,
)

try:
    __version__ = version("loraloom")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# Imported on first use, so `loraloom --help` does not wait for torch and diffusers (loraloom/_lazy.py).
__getattr__, __dir__ = lazy_exports(globals(), {
    "LoRA": ".composition",
    "LoRAInfo": ".composition",
    "load_lora": ".composition",
    "read_lora_info": ".composition",
    "REGISTRY": ".composition.methods",
    "DenoiseContext": ".composition.methods",
    "Method": ".composition.methods",
    "available_methods": ".composition.methods",
    "describe_params": ".composition.methods",
    "get_method": ".composition.methods",
    "make_method": ".composition.methods",
    "register": ".composition.methods",
    "ComposedPipeline": ".pipelines",
    "GenerationOutput": ".pipelines",
    "Run": ".pipelines",
})

__all__ = [
    "REGISTRY",
    "AdapterNameError",
    "ComposedPipeline",
    "DenoiseContext",
    "GenerationError",
    "GenerationOutput",
    "IncompatibleLoRA",
    "LoRA",
    "LoRAFileError",
    "LoRAInfo",
    "LoraloomError",
    "Method",
    "SpecError",
    "UnsupportedLoRAFormat",
    "__version__",
    "available_methods",
    "describe_params",
    "get_method",
    "load_lora",
    "make_method",
    "read_lora_info",
    "register",
]
