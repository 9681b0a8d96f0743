"""loraloom's core: LoRA files, the routing layer and the composition methods (no UI, no pipelines)."""

from loraloom._lazy import lazy_exports

from .errors import (
    AdapterNameError,
    GenerationError,
    IncompatibleLoRA,
    LoRAFileError,
    LoraloomError,
    SpecError,
    UnsupportedLoRAFormat,
)

# Imported on first use (torch and diffusers are slow to import; see loraloom/_lazy.py).
__getattr__, __dir__ = lazy_exports(globals(), {
    "Conditioning": ".conditioning",
    "LoRA": ".lora",
    "LoRAInfo": ".lora",
    "LoRALayer": ".lora",
    "load_lora": ".lora",
    "read_lora_info": ".lora",
    "LoRARouter": ".routing",
    "Routing": ".routing",
    "RowBlock": ".routing",
})

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
