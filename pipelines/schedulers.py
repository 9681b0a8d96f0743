"""Any diffusers scheduler by name, built from the base model's own scheduler config."""

from __future__ import annotations

import inspect

import diffusers

from .defaults import DEFAULTS

# Short names users know (A1111/ComfyUI style) -> (diffusers class, config overrides).
ALIASES: dict[str, tuple[str, dict]] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmsolver++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SCHEDULER = DEFAULTS.scheduler  # the name `make_scheduler(None)` gives


def scheduler_names() -> list[str]:
    return ["default", *ALIASES]


def make_scheduler(name: str | None, base_config, default_cls=None):
    """A fresh scheduler: an alias above, 'default' (the model's own), or a diffusers class name."""
    name = name or DEFAULT_SCHEDULER
    if name == "default":
        if default_cls is None:
            raise ValueError("'default' scheduler needs the model's scheduler class")
        return default_cls.from_config(base_config)
    cls_name, overrides = ALIASES.get(name.lower(), (name, {}))
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not inspect.isclass(cls) or not cls_name.endswith("Scheduler"):
        raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(scheduler_names())} or a diffusers scheduler class name")
    return cls.from_config(base_config, **overrides)


def step_kwargs(scheduler, generator) -> dict:
    """Extra `scheduler.step` arguments the scheduler accepts (stochastic samplers take the generator)."""
    params = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in params else {}
