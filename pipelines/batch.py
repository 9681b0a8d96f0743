"""Batch generation from a spec file: prompts x seeds x methods, resumable (existing images are skipped),
every PNG written atomically with the spec that made it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from loraloom.composition.errors import LoRAFileError, SpecError
from loraloom.composition.files import WritePolicy, WriteRefused, read_yaml_file, remove_stale_temps
from loraloom.composition.frequency import cache_folder
from loraloom.composition.lora_file import FileDigest, FileState, file_digest, file_sha256
from loraloom.composition.methods import written_paths
from loraloom.composition.transformer_loras import read_any_lora_info
from loraloom.resources import examples, shipped

from .composed import ComposedPipeline, GenerationOutput, check_offload
from .prompt_tags import apply_tags, has_tags
from .spec import GenerationSpec, LoRARef, Provenance, RegionRef, mask_image, mask_label, pin_mask, save_png

# Fields a spec file sets once for every image (the GenerationSpec template) and the grid and run fields.
TEMPLATE_FIELDS = ("negative_prompt", "steps", "guidance_scale", "height", "width", "scheduler", "family", "dtype",
                   "base_weight")
BATCH_FIELDS = {
    "model", "loras", *TEMPLATE_FIELDS, "regions", "prompt", "prompts", "method", "methods", "method_params", "seed",
    "seeds", "local_files_only", "model_config", "out",
}


@dataclass
class BatchSpec:
    """A spec file: a `GenerationSpec` template (one base model, one LoRA list, the sampler settings) and the grid
    of prompts x methods x seeds it expands into, plus how to run it (not part of any image's spec)."""

    template: GenerationSpec  # prompt, method, method_params and seed are set per grid point by `expand`
    prompts: list[str]
    methods: list[str]
    seeds: list[int]
    method_params: dict = field(default_factory=dict)  # method name -> its parameters
    local_files_only: bool = False
    model_config: str | None = None
    out: str | None = None
    source: Path | None = None

    @property
    def loras(self) -> list[LoRARef]:
        return self.template.loras


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


def _resolve_mask(mask, base: Path, where: str):
    """A mask image path in a spec file is relative to the spec's folder, like a LoRA's; the file is read now (it
    must be an image) and its sha256 recorded (checked again whenever it is read: `spec.mask_image`)."""
    if isinstance(mask, dict):
        path = Path(mask["image"]).expanduser()
        mask = pin_mask({**mask, "image": str(path if path.is_absolute() else (base / path).resolve())}, where)
    return mask


def load_batch_spec(path: str | os.PathLike, overrides: dict | None = None) -> BatchSpec:
    """Read a YAML/JSON batch spec; `overrides` (from CLI flags) replace fields."""
    path = Path(path)
    if not path.exists() and (found := shipped(path)) is not None:
        path = found  # an example shipped with loraloom, named as in the repository (works from any folder)
    if not path.exists():
        raise SpecError(f"{path}: no such spec file (the shipped examples: {', '.join(examples())})")
    data = read_yaml_file(path, "spec file")
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
    """A BatchSpec from a spec file's fields; every field and every method's parameters are checked here, before
    any model or LoRA is loaded."""
    unknown = set(data) - BATCH_FIELDS
    where = f"{source}: " if source else ""
    if unknown:
        raise SpecError(f"{where}unknown field(s) {sorted(unknown)}; known: {sorted(BATCH_FIELDS)}")
    if "model" not in data:
        raise SpecError(f"{where}the spec needs a 'model' (diffusers folder, hub id, single file, or tiny:sd1)")
    loras = []
    for item in data.get("loras") or []:
        if not isinstance(item, (str, dict)):
            raise SpecError(f"{where}a LoRA entry is a path or a mapping with a 'path', got {item!r}")
        item = {"path": item} if isinstance(item, str) else dict(item)
        if "path" not in item:
            raise SpecError(f"{where}every LoRA entry needs a 'path': {item!r}")
        try:
            ref = LoRARef(**item)
            ref.path = _resolve(str(ref.path), base)
            ref.mask = _resolve_mask(ref.mask, base, f"LoRA {ref.adapter_name}")
        except TypeError as err:
            raise SpecError(f"{where}bad LoRA entry {item!r}: {err}") from None
        except SpecError as err:
            raise SpecError(f"{where}{err}") from None
        loras.append(ref)
    regions = data.get("regions") or []
    if not isinstance(regions, list):
        raise SpecError(f"{where}regions must be a list, e.g. [{{mask: left, prompt: 'a red star', loras: [character]}}]")
    region_refs = []
    for i, item in enumerate(regions):
        try:
            region = RegionRef.from_mapping(item, f"region {i + 1}")
            region.check(f"region {i + 1}", [r.adapter_name for r in loras])
            region.mask = _resolve_mask(region.mask, base, f"region {i + 1} ({mask_label(region.mask)})")
        except SpecError as err:
            raise SpecError(f"{where}{err}") from None
        for name in ("prompt", "negative_prompt"):
            if has_tags(getattr(region, name)):
                raise SpecError(f"{where}region {i + 1} ({mask_label(region.mask)}): its {name} has a LoRA tag. Fix: name "
                                "the region's LoRAs in its 'loras', and set their strengths and controls in their LoRA "
                                "entries or in tags in the main prompt")
        region_refs.append(region)
    methods = _as_list(data, "method", "methods", default=["merge"])
    method_params = data.get("method_params") or {}
    if not isinstance(method_params, dict) or not all(isinstance(v, dict) for v in method_params.values()):
        raise SpecError(f"{where}method_params must map a method name to its parameters, e.g. {{composite: {{max_batch: 4}}}}")
    seeds = [int(s) for s in _as_list(data, "seed", "seeds", default=[0])]
    prompts = [str(p) for p in _as_list(data, "prompt", "prompts")]
    settings = {k: data[k] for k in TEMPLATE_FIELDS if data.get(k) is not None}
    if has_tags(settings.get("negative_prompt")):
        raise SpecError(f"{where}the negative prompt has a LoRA tag; LoRA tags are read from the prompt only (A1111 "
                        "applies LoRAs from the prompt). Fix: move the tag to the prompt, or remove it")
    try:
        template = GenerationSpec(model=_resolve(str(data["model"]), base), prompt="", loras=loras, regions=region_refs,
                                  **settings)
        # Unknown methods or parameters fail here, before any model is loaded (also the parameters of a method a
        # flag such as --method left out of this run: the spec file itself is wrong). So do LoRA tags in the prompts
        # (malformed, naming no LoRA of the spec) and controls a method cannot run.
        variants = [dataclasses.replace(template, method=m, method_params=dict(method_params.get(m, {})))
                    for m in dict.fromkeys([*methods, *method_params])]
        for i, prompt in enumerate(prompts):
            text, tagged = apply_tags(prompt, loras, f"prompt {i + 1}" if len(prompts) > 1 else "prompt")
            if text != prompt:
                for variant in variants:
                    dataclasses.replace(variant, loras=tagged)
    except SpecError as err:
        raise SpecError(f"{where}{err}") from None
    return BatchSpec(
        template=template, prompts=prompts, methods=methods, seeds=seeds, method_params=method_params,
        local_files_only=bool(data.get("local_files_only", False)), model_config=data.get("model_config"),
        out=data.get("out"), source=source,
    )


def complete_lora_refs(refs: Iterable[LoRARef], allow_pickle: bool = False) -> list[LoRARef]:
    """Fill category/triggers from the LoRA's sidecar or header when the spec leaves them out; add file hashes
    (`PipelineCache.get` then refuses a file whose bytes are no longer these)."""
    out = []
    for ref in refs:
        path = Path(ref.path)
        if not path.exists():
            raise LoRAFileError(path, "no such LoRA file.", "check the path in the spec (relative paths start at the spec's folder).")
        if not ref.triggers or not ref.category:
            info = read_any_lora_info(path, allow_pickle=allow_pickle)
            ref.triggers = ref.triggers or list(info.triggers)
            ref.category = ref.category or info.category
        ref.sha256 = ref.sha256 or file_sha256(path)
        out.append(ref)
    return out


def expand_prompt(prompt: str, loras: list[LoRARef]) -> str:
    """`{triggers}` -> every LoRA's trigger words, comma-joined in LoRA order (as ComposLoRA builds prompts)."""
    triggers = ", ".join(t for ref in loras for t in ref.triggers)
    return prompt.replace("{triggers}", triggers)


def expand(batch: BatchSpec, allow_pickle: bool = False) -> list[GenerationSpec]:
    """One GenerationSpec per (prompt, method, seed). LoRA tags in a prompt (`prompt_tags`) are taken out of it and
    merged into that prompt's LoRA entries (the tag wins) before `{triggers}` is expanded."""
    loras = complete_lora_refs(batch.loras, allow_pickle)
    names = [r.adapter_name for r in loras]
    if len(set(names)) != len(names):
        raise SpecError(f"two LoRAs share an adapter name {names}; give them distinct 'name' fields")
    template = dataclasses.replace(batch.template, loras=loras)
    tagged = []
    for i, prompt in enumerate(batch.prompts):
        where = f"{batch.source}: " if batch.source else ""
        try:
            text, refs = apply_tags(prompt, loras, f"prompt {i + 1}" if len(batch.prompts) > 1 else "prompt")
        except SpecError as err:
            raise SpecError(f"{where}{err}") from None
        tagged.append((expand_prompt(text, refs), refs))
    return [
        dataclasses.replace(template, prompt=prompt, loras=[LoRARef(**vars(r)) for r in refs],
                            regions=[RegionRef(**vars(r)) for r in template.regions],
                            method=method, method_params=dict(batch.method_params.get(method, {})), seed=seed)
        for prompt, refs in tagged for method in batch.methods for seed in batch.seeds
    ]


@dataclass
class LoadedFile:
    """A file whose contents are in memory: its path, its state when read, and the hashes of the bytes read."""

    path: str
    state: FileState
    digest: FileDigest


def read_unchanged(path: str | os.PathLike, load: Callable[[], object], undo: Callable[[], None] = lambda: None,
                   tries: int = 3) -> tuple[object, LoadedFile]:
    """Run `load()` (which reads the file at `path`) and hash the file, so that the hashes are those of the bytes
    `load()` read: the file's state is taken before hashing and again after loading, and must not have changed
    (nor its bytes, for a file changed just now: `FileState.settled`). Otherwise a writer was at work: `undo()`,
    then read again; after `tries` attempts a `LoRAFileError`."""
    for _ in range(tries):
        before = _state(path)
        digest = file_digest(path)
        result = load()
        after = _state(path)
        if before == after and (before.settled() or file_digest(path) == digest):
            return result, LoadedFile(str(path), after, digest)
        undo()
    raise LoRAFileError(path, f"changed while it was being read ({tries} tries).",
                        "wait until whatever writes the file has finished, then generate again.")


def _state(path) -> FileState:
    try:
        return FileState.of(path)
    except FileNotFoundError:
        raise LoRAFileError(path, "no such file.", "check the path (the file was there before; was it moved?).") from None


def _unchanged(loaded: LoadedFile) -> bool:
    """The file still holds the bytes that were read (stat first; the bytes only when stat says it changed). A file
    removed since is taken as unchanged: what is loaded is still what its hashes say."""
    try:
        state = FileState.of(loaded.path)
    except FileNotFoundError:
        return True
    if state == loaded.state:
        return True
    if file_digest(loaded.path) == loaded.digest:  # touched, copied over with the same bytes: keep what is loaded
        loaded.state = state
        return True
    return False


class PipelineCache:
    """Keeps one ComposedPipeline per base model and loads LoRAs into it on demand.

    What is loaded is what the files hold: before each generation (`get`) every LoRA file (and a single-file
    checkpoint) is checked against the state it had when read, and read again when it changed, so a file replaced
    while loaded (the web UI runs for days) is not used with its old weights. The hashes kept are those of the bytes
    loaded (`read_unchanged`); `recorded` puts them into the PNG's spec. A spec that names a LoRA's sha256 (a PNG's
    spec, or a spec file's `sha256:`) is refused when the file's bytes are no longer those."""

    def __init__(self, device: str = "cpu", local_files_only: bool = False, model_config: str | None = None,
                 allow_pickle: bool = False, offload: str | None = None):
        self.device = device
        self.offload = offload  # 'model' / 'sequential': `ComposedPipeline.enable_offload` on every model loaded
        self.local_files_only = local_files_only
        self.model_config = model_config
        self.allow_pickle = allow_pickle
        self._key = None
        self.pipeline: ComposedPipeline | None = None
        self._files: dict[str, LoadedFile] = {}  # adapter name -> its file as loaded
        self._model_file: LoadedFile | None = None  # a single-file checkpoint as loaded

    def forget(self, name: str) -> None:
        """Unload a LoRA so the next spec that uses it reloads the file (after its sidecar or file changed)."""
        if self.pipeline is not None and name in self._files:
            self.pipeline.remove_lora(name)
            del self._files[name]

    def get(self, spec: GenerationSpec) -> ComposedPipeline:
        """The pipeline for `spec`'s model, holding `spec`'s LoRAs as their files are now."""
        key = (spec.model, spec.family, spec.dtype)
        if key != self._key or (self._model_file is not None and not _unchanged(self._model_file)):
            self._load_model(spec, key)
        for ref in spec.loras:
            self._load_lora(ref)
        return self.pipeline

    def _load_model(self, spec: GenerationSpec, key) -> None:
        self.pipeline, self._key, self._files, self._model_file = None, None, {}, None  # free the old one first

        check_offload(self.offload)  # no accelerator: refused before loading

        def load():
            cp = ComposedPipeline.from_pretrained(
                spec.model, family=spec.family, dtype=spec.dtype, device="cpu" if self.offload else self.device,
                local_files_only=self.local_files_only, config=self.model_config,
            )
            cp.enable_offload(self.offload)
            return cp

        path = Path(spec.model).expanduser()
        if path.is_file():  # a single-file checkpoint: its hash is A1111's "Model hash"
            self.pipeline, self._model_file = read_unchanged(path, load)
        else:
            self.pipeline = load()
        self._key = key

    def _load_lora(self, ref: LoRARef) -> None:
        name = ref.adapter_name
        loaded = self._files.get(name)
        if loaded is not None and (loaded.path != ref.path or not _unchanged(loaded)):
            self.forget(name)
            loaded = None
        if loaded is None:
            _, loaded = read_unchanged(ref.path, lambda: self.pipeline.load_lora(ref.path, name, allow_pickle=self.allow_pickle),
                                       undo=lambda: self.pipeline.remove_lora(name))
            self._files[name] = loaded
        pin = (ref.sha256 or "").lower()
        if pin and not (loaded.digest.sha256 == pin or (len(pin) >= 10 and loaded.digest.sha256.startswith(pin))):
            raise LoRAFileError(
                ref.path,
                f"is not the file this spec was made with: the spec records sha256 {pin[:12]}…, the file now has "
                f"{loaded.digest.sha256[:12]}….",
                "put back the file the spec names (a PNG is remade only from the same bytes), or leave 'sha256' out "
                "of the spec to use the file as it is now (a spec file: run it again; images already made are kept).",
            )

    def recorded(self, spec: GenerationSpec, output: GenerationOutput) -> tuple[GenerationSpec, Provenance]:
        """The spec of an image `get(spec)`'s pipeline just made, as its PNG records it, and the run's `Provenance`
        for the A1111 text. Call it before anything else uses the cache (the web UI: under the same lock).

        Recorded: the size of the image (the spec may leave it to the model), the steps, guidance scale and scheduler
        used (the model family's where the spec leaves them unset), the sha256 of each LoRA's bytes as
        loaded, and every method parameter in effect, defaults included (`GenerationSpec.identity` ignores the
        defaults, so the PNG keeps the file name of the spec as written)."""
        loras = [dataclasses.replace(ref, sha256=self._files[ref.adapter_name].digest.sha256) for ref in spec.loras]
        image = output.images[0]
        # Mask images: the sha256 `pin_masks` recorded before the run (which `generate_image` checked as it read
        # them); a spec made without it gets the file's now.
        # Steps, guidance and scheduler the spec left to the model family: the values used.
        arch = self.pipeline.arch if self.pipeline is not None else None
        sampler = {"steps": output.steps if spec.steps is None else spec.steps,
                   "guidance_scale": output.guidance_scale if spec.guidance_scale is None else spec.guidance_scale,
                   "scheduler": spec.scheduler or (arch.default_scheduler if arch is not None else None)}
        done = pin_masks(dataclasses.replace(spec, loras=loras, height=image.height, width=image.width,
                                             method_params=dict(output.params), **sampler))
        provenance = Provenance(
            lora_hashes={ref.adapter_name: self._files[ref.adapter_name].digest.autov3 for ref in spec.loras},
            model_hash=self._model_file.digest.autov2 if self._model_file is not None else None,
            scheduler=dict(output.scheduler) or None,
        )
        return done, provenance


def pin_masks(spec: GenerationSpec) -> GenerationSpec:
    """`spec` with the sha256 of every mask image it names (read now; a recorded sha256 is checked, `SpecError` when
    the file changed or is gone). Named regions and boxes need nothing. What `run_specs` does before any model loads,
    so that the PNG records the mask bytes the generation read (`generate_image` reads them again and checks)."""
    if not any(isinstance(r.mask, dict) for r in [*spec.loras, *spec.regions]):
        return spec
    loras = [dataclasses.replace(r, mask=pin_mask(r.mask, f"LoRA {r.adapter_name}")) for r in spec.loras]
    regions = [dataclasses.replace(r, mask=pin_mask(r.mask, f"region {i + 1} ({mask_label(r.mask)})"))
               for i, r in enumerate(spec.regions)]
    return dataclasses.replace(spec, loras=loras, regions=regions)


def pipeline_arguments(spec: GenerationSpec) -> dict:
    """The `loras`, `regions` and `base_weight` arguments of `ComposedPipeline.__call__` for a spec: a LoRA without
    controls as (name, weight), as always; with controls as (name, weight, LoRAControls); a mask image read from its
    file (checked against the sha256 the spec records)."""
    loras = []
    for ref in spec.loras:
        if not ref.has_controls:
            loras.append((ref.adapter_name, ref.weight))
            continue
        image = mask_image(ref.mask, f"LoRA {ref.adapter_name}") if isinstance(ref.mask, dict) else None
        loras.append((ref.adapter_name, ref.weight, ref.controls(image)))
    regions = [r.region(mask_image(r.mask, f"region {i + 1} ({mask_label(r.mask)})") if isinstance(r.mask, dict) else None)
               for i, r in enumerate(spec.regions)]
    return {"loras": loras, "regions": regions, "base_weight": spec.base_weight}


def generate_image(cp: ComposedPipeline, spec: GenerationSpec, output_dir: str | os.PathLike, progress_bar: bool = False,
                   callback=None):
    """Run one spec on a pipeline that holds its LoRAs; returns the GenerationOutput. Files the method writes stay
    in `output_dir` (`ComposedPipeline.write_policy`). The LoRAs' controls, the regions and the base weight go to
    the pipeline (`pipeline_arguments`)."""
    return cp(
        spec.prompt, negative_prompt=spec.negative_prompt, **pipeline_arguments(spec),
        method=spec.method, method_params=spec.method_params, num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale, height=spec.height, width=spec.width, seed=spec.seed,
        scheduler=spec.scheduler, progress_bar=progress_bar, callback_on_step_end=callback, output_dir=output_dir,
    )


def check_written_paths(specs: Iterable[GenerationSpec], out_dir: str | os.PathLike) -> None:
    """Refuse, before any model loads, every file a spec's method would write outside `out_dir` (or loraloom's cache
    folder): paths in a spec or a PNG are data; the error lists them all."""
    policy = WritePolicy.at(out_dir, allowed=[cache_folder()])
    refused = []
    for spec in specs:
        for name, value in written_paths(spec.method, spec.method_params).items():
            try:
                policy.resolve(value, f"{spec.method}.{name}")
            except WriteRefused:
                refused.append(f"{spec.method}.{name}={value!r}")
    if refused:
        raise SpecError(f"the spec names files outside the output folder {policy.root}: {', '.join(dict.fromkeys(refused))}. "
                        "Fix: use paths relative to the output folder (they land there), or choose --out so that it holds them.")


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
    out_dir = Path(out_dir).resolve()  # absolute: the write policy takes a relative path as relative to its root
    check_written_paths(specs, out_dir)
    specs = [pin_masks(spec) for spec in specs]  # mask images missing or changed: refused before any model loads
    cache = cache or PipelineCache()
    remove_stale_temps(out_dir)
    paths, skipped = [], 0
    order = sorted(range(len(specs)), key=lambda i: (specs[i].model, specs[i].family or "", specs[i].dtype))
    bar = tqdm(total=len(specs), desc="images", disable=not progress, unit="img")
    kept = ExitStack()  # each pipeline keeps Merge's fused weights between images (fused once per LoRA set)
    held: set[int] = set()
    try:
        for i in order:
            spec = specs[i]
            path = out_dir / spec.file_name()
            if skip_existing and path.exists():
                skipped += 1
            else:
                cp = cache.get(spec)
                if id(cp) not in held:
                    held.add(id(cp))
                    kept.enter_context(cp.keep_fused())
                out = generate_image(cp, spec, out_dir)
                # The file name stays that of the spec as written; the PNG records what was used (`recorded`).
                done, provenance = cache.recorded(spec, out)
                save_png(out.images[0], path, done, cp.write_policy(out_dir), provenance)
                if on_image:
                    on_image(path, spec)
            paths.append(path)
            bar.update(1)
    finally:
        kept.close()
        bar.close()
    return paths, skipped

