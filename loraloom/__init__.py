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

from .composition import LoRA, LoRAInfo, load_lora, read_lora_info
from .composition.errors import (
    AdapterNameError,
    GenerationError,
    IncompatibleLoRA,
    LoRAFileError,
    LoraloomError,
    SpecError,
    UnsupportedLoRAFormat,
)
from .composition.methods import (
    REGISTRY,
    DenoiseContext,
    Method,
    available_methods,
    describe_params,
    get_method,
    make_method,
    register,
)
from .pipelines import ComposedPipeline, GenerationOutput

try:
    __version__ = version("loraloom")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

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
