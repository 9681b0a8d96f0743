"""The sampler settings every entry point starts from, in one record: the Python API, spec files and PNG specs,
the web UI and the benchmark manifests all take their defaults from `DEFAULTS`.

The values are ComposLoRA's (Zhong et al. 2024; docs/methods/composlora.md#defaults): 30 steps, CFG 7.5,
DPM-Solver++ (multistep), and the model's own image size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerSettings:
    """How one image is sampled, besides its prompt, LoRAs, method and seed. `height`/`width` None: the model's size."""

    steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str = "dpmsolver++"
    height: int | None = None
    width: int | None = None


DEFAULTS = SamplerSettings()
