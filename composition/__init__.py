"""loraloom's core: LoRA files, the routing layer and the composition methods (no UI, no pipelines)."""

from .conditioning import Conditioning
from .errors import (
    AdapterNameError,
    GenerationError,
    IncompatibleLoRA,
    LoRAFileError,
    LoraloomError,
    SpecError,
    UnsupportedLoRAFormat,
)
from .lora import LoRA, LoRAInfo, LoRALayer, load_lora, read_lora_info
from .routing import LoRARouter, Routing, RowBlock

__all__ = [
    "AdapterNameError",
    "Conditioning",
    "GenerationError",
    "IncompatibleLoRA",
    "LoRA",
    "LoRAFileError",
    "LoRAInfo",
    "LoRALayer",
    "LoRARouter",
    "LoraloomError",
    "Routing",
    "RowBlock",
    "SpecError",
    "UnsupportedLoRAFormat",
    "load_lora",
    "read_lora_info",
]
