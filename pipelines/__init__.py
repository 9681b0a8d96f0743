"""Diffusers pipelines that run a composition step by step, and the specs/PNG metadata of what they make."""

from .composed import ComposedPipeline, GenerationOutput
from .denoise import denoise
from .loading import ModelLoadError, load_base_pipeline, pipeline_family
from .run import Run
from .schedulers import DEFAULT_SCHEDULER, make_scheduler, scheduler_names

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
