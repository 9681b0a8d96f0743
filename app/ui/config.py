"""What the web UI serves: models, LoRA and output folders, CLIP for Compare, defaults of the Compose tab.

Defaults: the shipped toy world (`assets/toyworld/`) when it is there, else the tiny random SD 1.x model with the
example LoRAs. `from_spec` takes the same fields from a `loraloom generate` spec file, and command-line flags
override both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from loraloom.composition.errors import SpecError
from loraloom.pipelines.defaults import DEFAULTS
from loraloom.resources import assets_dir

ASSETS = assets_dir()
TOYWORLD_SPEC = ASSETS / "examples" / "toyworld.yaml"
TINY_SPEC = ASSETS / "examples" / "tiny_sd1.yaml"
TINY_MODELS = ("tiny:sd1", "tiny:sdxl")


def _toyworld():
    from loraloom.evaluation.toyworld import CLIP, LORAS_DIR, MODEL

    return MODEL, LORAS_DIR, CLIP


@dataclass
class UIConfig:
    models: list[str]  # the base models offered; the first is loaded at start
    lora_dirs: list[Path]
    output_dir: Path = Path("outputs/ui")
    model_dirs: list[Path] = field(default_factory=list)  # more folders whose models may be picked
    clip: str | None = None  # transformers CLIP folder for CLIPScore (None: no score; the toy world's own for its images)
    judge: dict | None = None  # MLLM judge for Score: {kind: openai|transformers, model, base_url, api_key_env}
    prompt: str = ""
    negative_prompt: str = ""
    loras: list[tuple[str, float]] = field(default_factory=list)  # preselected (library name, weight)
    method: str = "merge"
    compare_methods: list[str] = field(default_factory=list)
    method_params: dict = field(default_factory=dict)  # {method: {param: value}} overriding the dataclass defaults
    steps: int | None = None  # None: the model family's (`GenerationSpec.steps`); the form's field is then empty
    guidance_scale: float | None = None
    scheduler: str = DEFAULTS.scheduler
    seed: int = 0
    height: int | None = DEFAULTS.height
    width: int | None = DEFAULTS.width
    device: str = "cpu"
    offload: str | None = None  # 'model' (--cpu-offload) or 'sequential' (--sequential-offload): `ComposedPipeline.enable_offload`
    dtype: str = "float32"
    local_files_only: bool = True
    max_png_mb: float = 20.0  # Reproduce uploads
    max_lora_mb: float = 1024.0  # Library uploads
    allow_lora_upload: bool = True
    preview_every: int = 1  # decode a preview every N steps (0: none) ...
    preview_interval: float = 0.25  # ... but not more often than every this many seconds (the last step always)
    max_queue: int = 64  # requests waiting for the model beyond this are refused ("queue full")
    max_sessions: int = 100  # client sessions whose page state the server keeps (least recently used dropped first)
    cache_minutes: float = 24 * 60  # files Gradio copied to its temp folder (previews, gallery, uploads) live this long
    max_loras: int = 8  # LoRA rows the form can show (two at first, "+ LoRA" adds one)
    name: str = "custom"  # shown in the page header: "toy world", "tiny random model", …

    @property
    def model_roots(self) -> list[Path]:
        """Folders (and single files) models may be read from."""
        roots = [Path(m).expanduser() for m in self.models if m not in TINY_MODELS and Path(m).expanduser().exists()]
        return roots + list(self.model_dirs)

    @property
    def file_roots(self) -> list[Path]:
        return [*self.model_roots, *self.lora_dirs, self.output_dir]

    def check(self) -> UIConfig:
        """Clear errors for folders that are not there, before the server starts."""
        if not self.models:
            raise SpecError("the UI needs at least one base model (--model)")
        for d in self.lora_dirs:
            if not Path(d).is_dir():
                raise SpecError(f"LoRA folder {d} does not exist; pass --lora-dir with a folder of .safetensors files")
        for d in self.model_dirs:
            if not Path(d).is_dir():
                raise SpecError(f"model folder {d} does not exist (--model-dir)")
        out = Path(self.output_dir).expanduser().resolve()
        for d in [*self.lora_dirs, *self.model_roots]:
            real = Path(d).expanduser().resolve()
            if out == real or out.is_relative_to(real):
                raise SpecError(f"the output folder {out} lies in the LoRA or model folder {real}, which loraloom never "
                                "writes; pass --output-dir with a folder of its own")
        return self


def from_spec(path: str | os.PathLike, name: str | None = None) -> UIConfig:
    """A UIConfig from a `loraloom generate` spec: its model, the folders of its LoRAs and its settings."""
    from loraloom.pipelines.batch import load_batch_spec

    batch = load_batch_spec(path)
    lora_dirs = list(dict.fromkeys(Path(ref.path).parent for ref in batch.loras))
    t = batch.template
    return UIConfig(
        models=[t.model], lora_dirs=lora_dirs, prompt=batch.prompts[0] if batch.prompts else "",
        negative_prompt=t.negative_prompt, loras=[(ref.adapter_name, ref.weight) for ref in batch.loras],
        method=batch.methods[0], compare_methods=list(batch.methods),
        method_params={m: dict(v) for m, v in batch.method_params.items()},
        steps=t.steps, guidance_scale=t.guidance_scale, scheduler=t.scheduler, seed=batch.seeds[0],
        height=t.height, width=t.width, dtype=t.dtype, name=name or Path(path).stem,
    )


def default_threads(cpu_count: int | None = None, torch_threads: int | None = None) -> int:
    """The UI's torch CPU thread count: torch's own choice, less one core left to the web server, the browser and
    the machine's other work (at least 1). On a 2-core machine that is 1 thread instead of torch's 2, which
    benchmarks/bench_ui_workbench.py measured faster per image (docs/ui.md, Speed); on a large machine it is
    torch's choice, or one less when torch takes every core."""
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if torch_threads is None:
        import torch

        torch_threads = torch.get_num_threads()
    return max(1, min(torch_threads, cpus - 1))


def toyworld_available() -> bool:
    model, loras, _ = _toyworld()
    return (model / "model_index.json").exists() and loras.is_dir()


def default_config() -> UIConfig:
    """The toy world when it is installed, else the tiny random model and the example LoRAs."""
    if toyworld_available():
        model, loras, clip = _toyworld()
        if TOYWORLD_SPEC.exists():
            cfg = from_spec(TOYWORLD_SPEC, name="toy world")
            cfg.models = [str(model)] + [m for m in cfg.models if Path(m).resolve() != model.resolve()]
            cfg.lora_dirs = [loras] + [d for d in cfg.lora_dirs if Path(d).resolve() != loras.resolve()]
        else:
            cfg = UIConfig(models=[str(model)], lora_dirs=[loras], name="toy world")
        cfg.clip = str(clip) if clip.is_dir() else None
        return cfg
    return from_spec(TINY_SPEC, name="tiny random model (its images are noise)")
