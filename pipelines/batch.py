"""Batch generation from a spec file: prompts x seeds x methods, resumable (existing images are skipped),
every PNG written atomically with the spec that made it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from loraloom.composition.errors import LoRAFileError, SpecError
from loraloom.composition.lora import read_lora_info
from loraloom.composition.methods import get_method

from .composed import ComposedPipeline
from .spec import GenerationSpec, LoRARef, file_sha256, save_png

BATCH_FIELDS = {
    "model", "family", "dtype", "local_files_only", "model_config", "loras", "prompt", "prompts", "negative_prompt",
    "method", "methods", "method_params", "steps", "guidance_scale", "height", "width", "scheduler", "seed", "seeds", "out",
}


@dataclass
class BatchSpec:
    """A spec file: one base model, one LoRA list, and the grid of prompts x seeds x methods."""

    model: str
    loras: list[LoRARef]
    prompts: list[str]
    methods: list[str]
    seeds: list[int]
    negative_prompt: str = ""
    method_params: dict = field(default_factory=dict)
    steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str = "dpmsolver++"
    family: str | None = None
    dtype: str = "float32"
    local_files_only: bool = False
    model_config: str | None = None
    out: str | None = None
    source: Path | None = None


def _as_list(data: dict, one: str, many: str, default=None) -> list:
    if one in data and many in data:
        raise SpecError(f"give either {one!r} or {many!r}, not both")
    if many in data:
        value = data[many]
        return [x.strip() for x in value.split(",")] if isinstance(value, str) and many != "prompts" else list(value)
    if one in data:
        return [data[one]]
    if default is None:
        raise SpecError(f"the spec needs {one!r} (or {many!r})")
    return list(default)


def _resolve(path: str, base: Path) -> str:
    """Paths in a spec file are relative to the spec's folder; hub ids and `tiny:` names pass through."""
    if path.startswith("tiny:"):
        return path
    p = Path(path).expanduser()
    candidate = p if p.is_absolute() else (base / p)
    if candidate.exists() or path.startswith((".", "/", "~")) or path.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        return str(candidate.resolve())
    return path  # a hub id


def load_batch_spec(path: str | os.PathLike, overrides: dict | None = None) -> BatchSpec:
    """Read a YAML/JSON batch spec; `overrides` (from CLI flags) replace fields."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML/JSON ({err})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a mapping of fields")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        for alias_one, alias_many in (("prompt", "prompts"), ("method", "methods"), ("seed", "seeds")):
            if key in (alias_one, alias_many):
                data.pop(alias_one, None)
                data.pop(alias_many, None)
        data[key] = value
    return batch_from_dict(data, base=path.parent, source=path)


def batch_from_dict(data: dict, base: Path = Path("."), source: Path | None = None) -> BatchSpec:
    unknown = set(data) - BATCH_FIELDS
    where = f"{source}: " if source else ""
    if unknown:
        raise SpecError(f"{where}unknown field(s) {sorted(unknown)}; known: {sorted(BATCH_FIELDS)}")
    if "model" not in data:
        raise SpecError(f"{where}the spec needs a 'model' (diffusers folder, hub id, single file, or tiny:sd1)")
    loras = []
    for item in data.get("loras") or []:
        item = {"path": item} if isinstance(item, str) else dict(item)
        if "path" not in item:
            raise SpecError(f"{where}every LoRA entry needs a 'path': {item!r}")
        try:
            ref = LoRARef(**item)
        except TypeError as err:
            raise SpecError(f"{where}bad LoRA entry {item!r}: {err}") from None
        ref.path = _resolve(str(ref.path), base)
        loras.append(ref)
    methods = _as_list(data, "method", "methods", default=["merge"])
    for m in methods:
        get_method(m)  # unknown names fail here, before any model is loaded
    method_params = data.get("method_params") or {}
    if not isinstance(method_params, dict) or any(k not in methods and not isinstance(v, dict) for k, v in method_params.items()):
        raise SpecError(f"{where}method_params must map a method name to its parameters, e.g. {{composite: {{max_batch: 4}}}}")
    seeds = [int(s) for s in _as_list(data, "seed", "seeds", default=[0])]
    prompts = [str(p) for p in _as_list(data, "prompt", "prompts")]
    return BatchSpec(
        model=_resolve(str(data["model"]), base), loras=loras, prompts=prompts, methods=methods, seeds=seeds,
        negative_prompt=str(data.get("negative_prompt") or ""), method_params=method_params,
        steps=int(data.get("steps", 30)), guidance_scale=float(data.get("guidance_scale", 7.5)),
        height=data.get("height"), width=data.get("width"), scheduler=str(data.get("scheduler", "dpmsolver++")),
        family=data.get("family"), dtype=str(data.get("dtype", "float32")), local_files_only=bool(data.get("local_files_only", False)),
        model_config=data.get("model_config"), out=data.get("out"), source=source,
    )


def complete_lora_refs(refs: Iterable[LoRARef]) -> list[LoRARef]:
    """Fill category/triggers from the LoRA's sidecar or header when the spec leaves them out; add file hashes."""
    out = []
    for ref in refs:
        path = Path(ref.path)
        if not path.exists():
            raise LoRAFileError(path, "no such LoRA file.", "check the path in the spec (relative paths start at the spec's folder).")
        if not ref.triggers or not ref.category:
            info = read_lora_info(path)
            ref.triggers = ref.triggers or list(info.triggers)
            ref.category = ref.category or info.category
        ref.sha256 = ref.sha256 or file_sha256(path)
        out.append(ref)
    return out


def expand_prompt(prompt: str, loras: list[LoRARef]) -> str:
    """`{triggers}` -> every LoRA's trigger words, comma-joined in LoRA order (as ComposLoRA builds prompts)."""
    triggers = ", ".join(t for ref in loras for t in ref.triggers)
    return prompt.replace("{triggers}", triggers)


def expand(batch: BatchSpec) -> list[GenerationSpec]:
    """One GenerationSpec per (prompt, method, seed)."""
    loras = complete_lora_refs(batch.loras)
    names = [r.adapter_name for r in loras]
    if len(set(names)) != len(names):
        raise SpecError(f"two LoRAs share an adapter name {names}; give them distinct 'name' fields")
    specs = []
    for prompt in batch.prompts:
        for method in batch.methods:
            for seed in batch.seeds:
                specs.append(GenerationSpec(
                    model=batch.model, prompt=expand_prompt(prompt, loras), negative_prompt=batch.negative_prompt,
                    loras=[LoRARef(**vars(r)) for r in loras], method=method, method_params=dict(batch.method_params.get(method, {})),
                    steps=batch.steps, guidance_scale=batch.guidance_scale, height=batch.height, width=batch.width,
                    scheduler=batch.scheduler, seed=seed, family=batch.family, dtype=batch.dtype,
                ))
    return specs


class PipelineCache:
    """Keeps one ComposedPipeline per base model and loads LoRAs into it on demand."""

    def __init__(self, device: str = "cpu", local_files_only: bool = False, model_config: str | None = None):
        self.device = device
        self.local_files_only = local_files_only
        self.model_config = model_config
        self._key = None
        self.pipeline: ComposedPipeline | None = None
        self._files: dict[str, str] = {}

    def forget(self, name: str) -> None:
        """Unload a LoRA so the next spec that uses it reloads the file (after its sidecar or file changed)."""
        if self.pipeline is not None and name in self._files:
            self.pipeline.remove_lora(name)
            del self._files[name]

    def get(self, spec: GenerationSpec) -> ComposedPipeline:
        key = (spec.model, spec.family, spec.dtype)
        if key != self._key:
            self.pipeline = ComposedPipeline.from_pretrained(
                spec.model, family=spec.family, dtype=spec.dtype, device=self.device,
                local_files_only=self.local_files_only, config=self.model_config,
            )
            self._key, self._files = key, {}
        for ref in spec.loras:
            name = ref.adapter_name
            if self._files.get(name) != ref.path:
                if name in self._files:
                    self.pipeline.remove_lora(name)
                self.pipeline.load_lora(ref.path, name)
                self._files[name] = ref.path
        return self.pipeline


def generate_image(cp: ComposedPipeline, spec: GenerationSpec, progress_bar: bool = False, callback=None):
    """Run one spec on a pipeline that holds its LoRAs; returns the GenerationOutput."""
    return cp(
        spec.prompt, negative_prompt=spec.negative_prompt, loras=[(r.adapter_name, r.weight) for r in spec.loras],
        method=spec.method, method_params=spec.method_params, num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale, height=spec.height, width=spec.width, seed=spec.seed,
        scheduler=spec.scheduler, progress_bar=progress_bar, callback_on_step_end=callback,
    )


def run_specs(
    specs: list[GenerationSpec],
    out_dir: str | os.PathLike,
    *,
    skip_existing: bool = True,
    cache: PipelineCache | None = None,
    progress: bool = True,
    on_image: Callable[[Path, GenerationSpec], None] | None = None,
) -> tuple[list[Path], int]:
    """Generate every spec into `out_dir` (file name from the spec's identity). Returns (paths, number skipped)."""
    out_dir = Path(out_dir)
    cache = cache or PipelineCache()
    paths, skipped = [], 0
    order = sorted(range(len(specs)), key=lambda i: (specs[i].model, specs[i].family or "", specs[i].dtype))
    bar = tqdm(total=len(specs), desc="images", disable=not progress, unit="img")
    try:
        for i in order:
            spec = specs[i]
            path = out_dir / spec.file_name()
            if skip_existing and path.exists():
                skipped += 1
            else:
                cp = cache.get(spec)
                out = generate_image(cp, spec)
                # The file name stays that of the spec as written; the PNG records the size actually used.
                image = out.images[0]
                save_png(image, path, dataclasses.replace(spec, height=image.height, width=image.width))
                if on_image:
                    on_image(path, spec)
            paths.append(path)
            bar.update(1)
    finally:
        bar.close()
    return paths, skipped

