"""What differs between model families, behind one small protocol: adding the next model (a DiT such as
Qwen-Image or FLUX.2) is one more file in this package.

A `Family` is bound to one loaded diffusers pipeline. The denoising loop (`pipelines.denoise`), the run context
(`pipelines.run.Run`), the routing layer and the methods only ever call these members, so they stay family-blind:
latents in the loop are always (B, C, h, w) tensors at the VAE's latent resolution, whatever the denoiser takes
(FLUX packs them into 2x2 patch tokens inside `predict` and unpacks its output).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from loraloom.composition.conditioning import Conditioning


class Family(Protocol):
    name: str  # 'sd1', 'sd2', 'sdxl', 'flux', 'sd3' (composition.metadata.FAMILY_NAMES)
    denoiser: str  # the pipeline component LoRAs' denoiser layers live in, and its router's name: 'unet', 'transformer'
    text_components: tuple[str, ...]  # text encoders present, in the pipeline's order
    distilled_guidance: bool  # guidance is an input of the model (FLUX.1): no unconditional branch, methods see CFG 1
    lora_targets: tuple[str, ...]  # module names LoRAs of this family usually target (docs and `loraloom loras`)
    block_names: tuple[str, ...]  # the denoiser's block containers, as they appear in module paths
    # Sampler settings when a caller (the Python API, a spec file, the CLI, the web UI) leaves them unset: the
    # family's usual ones, read from the loaded model where the variants differ (FLUX.1 dev/schnell, SD 3/3.5).
    default_steps: int
    default_guidance: float
    default_scheduler: str  # the scheduler name a spec records for "unset" (SD: DEFAULTS.scheduler; flow: 'default')

    @property
    def default_size(self) -> int: ...

    @property
    def size_multiple(self) -> int: ...

    @staticmethod
    def config_geometry(folder) -> tuple[int, int] | None:
        """(default image side, the multiple sides must be) read from a diffusers folder's component configs without
        loading any weights; None when the configs it needs are missing."""
        ...

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one image's initial noise as `initial_latents` draws it (float32, from the generator)."""
        ...

    def make_scheduler(self, name: str | None, num_inference_steps: int | None, height: int, width: int, device): ...

    def initial_latents(self, height: int, width: int, generator: torch.Generator, device, dtype) -> torch.Tensor: ...

    def init_noise_sigma(self, scheduler) -> float: ...

    def encode(self, prompts: list[str], negatives: list[str], height: int, width: int) -> tuple[Conditioning, Conditioning]: ...

    def model_input(self, scheduler, latents: torch.Tensor, timestep) -> torch.Tensor: ...

    def predict(self, x: torch.Tensor, timestep, conditioning: Conditioning, guidance_scale: float) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor, output_type: str = "pil"): ...


def flow_scheduler(pipe, name: str | None, family: str):
    """The model's own flow-matching scheduler for 'default'/None or its class name; other names are refused
    (the Stable Diffusion samplers predict noise, these models predict a flow velocity)."""
    from loraloom.composition.errors import SpecError

    own = type(pipe.scheduler)
    if name in (None, "default", own.__name__):
        return own.from_config(pipe.scheduler.config)
    raise SpecError(f"scheduler {name!r} does not sample {family} models (they are flow-matching models). Fix: use "
                    f"'default' (the model's {own.__name__}).")


def read_configs(folder, *names: str) -> list[dict] | None:
    """The `config.json` of each named component of a diffusers folder, or None if one is missing."""
    import json
    from pathlib import Path

    paths = [Path(folder) / n / "config.json" for n in names]
    if not all(p.is_file() for p in paths):
        return None
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def vae_scale(vae_config: dict) -> int:
    """The VAE's downsampling factor, as the diffusers pipelines compute `vae_scale_factor`."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def text_routing_gates(text_gates: list[Mapping[str, float]]):
    from loraloom.composition.routing import Routing

    return Routing.from_blocks([(1, g) for g in text_gates])


def joint_block_stream(leaf: str) -> str | None:
    """Which tokens a layer of an MMDiT joint block (FLUX's double-stream, SD3's joint blocks) sees, by its path inside
    the block: the text stream's projections (`attn.add_q_proj`, `attn.add_k_proj`, `attn.add_v_proj`,
    `attn.to_add_out`) and `ff_context` see the text tokens; the image stream's (`attn.to_q/k/v`, `attn.to_out`,
    SD 3.5's second attention `attn2`) and `ff` the image tokens; the modulations (`norm1.linear`,
    `norm1_context.linear`: the time embedding, no positions) neither (None)."""
    if leaf.startswith(("attn.add_", "attn.to_add_out", "ff_context.")):
        return "text"
    if leaf.startswith(("attn.to_", "attn2.", "ff.")):
        return "image"
    return None


# Methods that run on the diffusion transformers (FLUX.1, SD3); the others refuse, each with its reason.
DIT_METHODS = ("merge", "switch", "composite", "klora", "loratorio", "cmlora", "clora", "tokenroute")
METHOD_LIMITS: dict[str, dict[str, str]] = {
    "transformer": {
        "ziplora": "its merge objective trains on the UNet's noise predictions (DDPM training scheduler); the "
                   "flow-matching objective is not implemented.",
        "hypernet": "the shipped hypernetwork and its trainer are made for the SD UNet's layer shapes.",
    },
}
