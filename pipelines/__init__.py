"""Diffusers pipelines that run a composition step by step, and the specs/PNG metadata of what they make."""

from loraloom._lazy import lazy_exports

# Imported on first use (torch and diffusers are slow to import; see loraloom/_lazy.py).
__getattr__, __dir__ = lazy_exports(globals(), {
    "ComposedPipeline": ".composed",
    "GenerationOutput": ".composed",
    "denoise": ".denoise",
    "ModelLoadError": ".loading",
    "load_base_pipeline": ".loading",
    "pipeline_family": ".loading",
    "Run": ".run",
    "DEFAULT_SCHEDULER": ".schedulers",
    "make_scheduler": ".schedulers",
    "scheduler_names": ".schedulers",
})

__all__ = [
    "DEFAULT_SCHEDULER",
    "ComposedPipeline",
    "GenerationOutput",
    "ModelLoadError",
    "Run",
    "denoise",
    "load_base_pipeline",
    "make_scheduler",
    "pipeline_family",
    "scheduler_names",
]
