"""Any diffusers scheduler by name, built from the base model's own scheduler config."""

from __future__ import annotations

import inspect

import diffusers

from loraloom.composition.errors import SpecError

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


def scheduler_class(name: str | None) -> tuple[type | None, dict]:
    """(diffusers class, config overrides) of a scheduler name; (None, {}) for 'default' (the model's own).

    Only the schedulers diffusers lists as compatible with the Stable Diffusion UNets
    (`KarrasDiffusionSchedulers`) are accepted: a flow-matching scheduler has no `init_noise_sigma` and samples
    another kind of model. Errors are `SpecError`, raised when a spec is read, before any model loads."""
    from diffusers.schedulers import KarrasDiffusionSchedulers

    name = name or DEFAULT_SCHEDULER
    if not isinstance(name, str):
        raise SpecError(f"scheduler must be a name, got {name!r}")
    if name == "default":
        return None, {}
    cls_name, overrides = ALIASES.get(name.lower(), (name, {}))
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not inspect.isclass(cls) or not cls_name.endswith("Scheduler"):
        raise SpecError(f"unknown scheduler {name!r}. Fix: use one of {', '.join(scheduler_names())} or a diffusers "
                        "scheduler class name.")
    if cls_name not in {e.name for e in KarrasDiffusionSchedulers}:
        raise SpecError(f"scheduler {name!r} does not sample Stable Diffusion 1.x/2.x/XL models (not one of diffusers' "
                        f"compatible schedulers). Fix: use one of {', '.join(scheduler_names())}.")
    return cls, overrides


def make_scheduler(name: str | None, base_config, default_cls=None):
    """A fresh scheduler: an alias above, 'default' (the model's own), or a diffusers class name (`scheduler_class`)."""
    cls, overrides = scheduler_class(name)
    if cls is None:
        if default_cls is None:
            raise ValueError("'default' scheduler needs the model's scheduler class")
        return default_cls.from_config(base_config)
    return cls.from_config(base_config, **overrides)


def step_kwargs(scheduler, generator) -> dict:
    """Extra `scheduler.step` arguments the scheduler accepts (stochastic samplers take the generator)."""
    params = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in params else {}
