"""The web UI's access to the engine: one model at a time behind a lock, the LoRA library, specs built from form
values, generation with per-step callbacks, CLIPScore, and settings read back from a PNG.

Everything here is plain Python (no Gradio), so it is tested and reused without a browser. Generation goes
through `pipelines.batch` (`PipelineCache`, `generate_image`, `complete_lora_refs`, `expand_prompt`) and
`pipelines.spec.save_png`, exactly as `loraloom generate` does: a PNG from the UI is one the CLI remakes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import random
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraloom.composition.errors import LoRAFileError, LoraloomError, SpecError
from loraloom.composition.files import WritePolicy, WriteRefused, remove_stale_temps, write_file, write_text
from loraloom.composition.frequency import cache_folder
from loraloom.composition.library import scan_loras
from loraloom.composition.lora import LoRAInfo, read_lora_info
from loraloom.composition.lora_file import file_digest, file_sha256, lora_name
from loraloom.composition.metadata import normalise_sidecar, read_sidecar, sidecar_paths
from loraloom.composition.methods import available_methods, make_method, written_paths
from loraloom.pipelines.batch import PipelineCache, complete_lora_refs, expand_prompt, generate_image
from loraloom.pipelines.families import folder_geometry
from loraloom.pipelines.prompt_tags import apply_tags, has_tags, parse_tags
from loraloom.pipelines.spec import A1111_CHUNK, SPEC_CHUNK, GenerationSpec, LoRARef, RegionRef, a1111_name, save_png

from .a1111 import import_infotext
from .config import UIConfig
from .history import History
from .params import path_values
from .paths import PathRefused, is_inside, resolve_inside
from .uploads import check_lora_upload, check_png_upload, safe_file_name

log = logging.getLogger(__name__)


class Cancelled(LoraloomError):
    """The generation was stopped before its last step; nothing was saved."""


MAX_SEED = 2**32 - 1  # seed -1 draws one from 0 to this (A1111's range)
LORA_CONTROLS = ("te", "unet", "lbw", "start", "stop", "unit", "keyframes", "mask", "feather")


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


@dataclass
class LoRAEntry:
    """A LoRA as a form or an API call names it: library name (or a path inside a LoRA folder), weight, and the
    per-LoRA controls it sets (docs/controls.md: te, unet, lbw, start, stop, unit, keyframes, mask, feather)."""

    name: str
    weight: float = 1.0
    controls: dict = field(default_factory=dict)


@dataclass
class LibraryItem:
    """A LoRA file of the library under the name the UI (and the specs it writes) use for it."""

    name: str
    path: Path
    info: LoRAInfo | None = None
    error: str | None = None
    preview: Path | None = None

    @property
    def triggers(self) -> list[str]:
        return list(self.info.triggers) if self.info else []


@dataclass
class GenerationResult:
    path: Path  # the PNG written (spec embedded)
    image: Any  # PIL image
    spec: GenerationSpec
    seconds: float  # the pipeline call alone (as GenerationOutput.seconds)
    clip_score: float | None = None


@dataclass
class Restored:
    """Settings read from a PNG, with the library names of its LoRAs and what could not be restored.

    `spec` holds the PNG's values that passed the checks (defaults in place of the others); `refused` names the
    spec fields and `refused_params` the method parameters whose values were not restored (the form keeps what it
    had); `warnings` says why, one sentence each; `text` is the spec JSON exactly as the PNG carries it."""

    spec: GenerationSpec
    model: str | None
    loras: list[tuple[str, float]]
    warnings: list[str] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)
    refused_params: set[str] = field(default_factory=set)
    text: str = ""
    settings: dict = field(default_factory=dict)  # the form's values to restore (`settings_of`)
    source: str = "loraloom"  # what wrote the PNG: loraloom, or the A1111 program its text names


def lora_entry(name: str, ref: LoRARef) -> dict:
    """A spec's LoRA as a form's (or /generate's) LoRA entry: name, weight and the controls it sets."""
    entry = {"name": name, "weight": float(ref.weight)}
    for key in ("te", "unet", "lbw", "start", "stop", "unit", "keyframes", "mask", "feather"):
        value = getattr(ref, key)
        if value not in (None, [], 0.0) and not (key in ("te", "unet") and value == 1.0):
            entry[key] = value
    return entry


def settings_of(spec: GenerationSpec, model: str | None, loras: list[dict], refused: set[str] = frozenset(),
                refused_params: set[str] = frozenset()) -> dict:
    """The form's values for a spec: {model, prompt, negative_prompt, loras, method, method_params {method: {…}},
    steps, guidance_scale, height, width, scheduler, seed, regions, base_weight}; refused fields left out."""
    out = {"model": model, "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "loras": loras,
           "method": spec.method, "method_params": {spec.method: {k: v for k, v in spec.method_params.items()
                                                                  if k not in refused_params}},
           "steps": spec.steps, "guidance_scale": spec.guidance_scale, "height": spec.height, "width": spec.width,
           "scheduler": spec.scheduler, "seed": spec.seed,
           "regions": [{k: v for k, v in dataclasses.asdict(r).items() if v not in (None, [], 0.0)} for r in spec.regions],
           "base_weight": spec.base_weight}
    if model is None:
        del out["model"]
    for name in refused:
        out.pop(name, None)
        if name == "method":
            out.pop("method_params", None)
        if name == "guidance_scale":
            out.pop("guidance_scale", None)
    return {k: v for k, v in out.items() if v is not None or k in ("height", "width")}


class GenerationService:
    """One model in memory at a time; one generation at a time (the lock), whatever calls in."""

    def __init__(self, config: UIConfig):
        self.config = config
        config.output_dir = Path(config.output_dir).expanduser().resolve()
        config.models = [str(Path(m).expanduser().resolve()) if Path(m).expanduser().exists() else m for m in config.models]
        self.cache = PipelineCache(device=config.device, local_files_only=config.local_files_only, offload=config.offload)
        self.lock = threading.Lock()
        self._library: list[LibraryItem] | None = None
        self._library_lock = threading.Lock()
        self._stale: set[str] = set()  # resident LoRAs whose sidecar changed
        self._hashes: dict[tuple, str] = {}
        self._clip = None
        self._judge = None
        self._cancel: threading.Event | None = None
        self.progress: tuple[int, int] | None = None  # (steps done, steps) of the running generation
        self._owner: str | None = None
        self._tokenizers: dict[str, list] = {}
        # Everything the UI writes for a generation stays in the output folder; model and LoRA folders are never written.
        self.write_policy = WritePolicy.at(config.output_dir, allowed=[cache_folder()],
                                           protected=[*config.lora_dirs, *config.model_roots])
        remove_stale_temps(config.output_dir)  # half-written PNGs of a server that was killed
        self.history = History(config.output_dir)

    # --- models ---------------------------------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        """The configured models, then every diffusers folder / .safetensors file found in the model folders."""
        found: list[str] = []
        for d in self.config.model_dirs:
            for child in sorted(Path(d).iterdir()):
                if (child / "model_index.json").exists() or child.suffix == ".safetensors":
                    if is_inside(child, self.config.model_dirs):
                        found.append(str(child))
        return list(dict.fromkeys([*self.config.models, *found]))

    def resolve_model(self, model: str) -> str:
        """A model the UI may load: one of the configured models, or a model (a diffusers folder or a .safetensors
        checkpoint) inside a configured model folder (`--model-dir`). Anything else — a hub id, `tiny:sdxl`, a
        path elsewhere — is refused: an API caller loads only what the person who started the UI offered."""
        if not isinstance(model, str) or not model.strip():
            raise SpecError(f"no base model given; pick one of {', '.join(self.model_choices())}.")
        model = model.strip()
        configured = self.config.models
        if model in configured:
            return model
        p = Path(model).expanduser()
        if (p.exists() or p.is_symlink()) and str(p.resolve()) in configured:
            return str(p.resolve())
        dirs = self.config.model_dirs
        if ".." in p.parts or p.is_absolute() or dirs:
            path = resolve_inside(model, dirs, "model")  # '..', elsewhere, a symlink out: PathRefused
            if path.exists():
                if not ((path / "model_index.json").is_file() or (path.is_file() and path.suffix == ".safetensors")):
                    raise SpecError(f"model {model!r}: {path} is not a model (a diffusers folder with model_index.json "
                                    "or a .safetensors checkpoint).")
                return str(path)
        raise SpecError(f"model {model!r} is not offered here: not one of this UI's models ({', '.join(configured)}) and "
                        f"nothing there inside the model folders ({', '.join(map(str, dirs)) or 'none configured'}). "
                        "Fix: pick a model from the list; other models (hub ids, tiny:sdxl, …) are offered by starting "
                        "the UI with `loraloom ui --model …` or `--model-dir …`.")

    def scheduler_for(self, model: str, scheduler: str | None) -> str | None:
        """The Scheduler box's value for `model` (loaded): as it is on a UNet model; 'default' (the model's own
        flow-matching scheduler) on FLUX.1 / SD 3.x, unless it names that scheduler's class."""
        cp = self.pipeline(model)
        if cp.arch.denoiser == "unet" or scheduler == type(cp.pipe.scheduler).__name__:
            return scheduler
        return "default"

    def pipeline(self, model: str):
        """Load (or keep) `model`; waits for a running generation."""
        spec = GenerationSpec(model=self.resolve_model(model), prompt="", dtype=self.config.dtype)
        with self.lock:
            return self.cache.get(spec)

    def geometry(self, model: str, load: bool = True) -> tuple[int, int]:
        """(default image side, the multiple sides must be) of `model`. Read from a diffusers folder's configs
        without loading it when `load` is False (so the page can answer while the model loads)."""
        folder = Path(self.resolve_model(model))
        if not load and (geometry := folder_geometry(folder)) is not None:  # the model family's configs (UNet, transformer)
            return geometry
        cp = self.pipeline(model)
        return cp.default_size, int(cp.size_multiple)

    # --- LoRA library ---------------------------------------------------------------------------------------
    def library(self, refresh: bool = False) -> list[LibraryItem]:
        with self._library_lock:
            if self._library is None or refresh:
                self._library = self._scan()
            return list(self._library)

    def _scan(self) -> list[LibraryItem]:
        roots = self.config.lora_dirs
        items = []
        for root in roots:
            for entry in scan_loras(root):
                item = LibraryItem(name=lora_name(entry.path), path=entry.path, info=entry.info, error=entry.error)
                if not is_inside(entry.path, roots):
                    item.info, item.error = None, "refused: a symlink that points outside the LoRA folders"
                else:
                    preview = entry.preview
                    item.preview = preview if preview is not None and is_inside(preview, roots) else None
                items.append(item)
        for item, name in zip(items, library_names([i.path for i in items], roots)):
            item.name = name
        return items

    def lora(self, name_or_path: str) -> LibraryItem:
        """A usable library LoRA by its name, or by a path inside the LoRA folders."""
        key = str(name_or_path).strip()
        for refresh in (False, True):
            for item in self.library(refresh=refresh):
                if item.name == key:
                    return self._usable(item)
        if "/" in key or "\\" in key or key.endswith(".safetensors") or ".." in key:
            path = resolve_inside(key, self.config.lora_dirs, "LoRA")
            for item in self.library():
                if item.path.resolve() == path:
                    return self._usable(item)
            raise LoRAFileError(path, "is not a LoRA file of the library.", "put it into a LoRA folder and press Refresh.")
        names = ", ".join(i.name for i in self.library()) or "none"
        raise LoRAFileError(None, f"no LoRA named {key!r} in the library (have: {names}).", "pick one from the list.")

    @staticmethod
    def _usable(item: LibraryItem) -> LibraryItem:
        if item.info is None:
            if item.error and item.error.startswith("refused"):
                raise PathRefused(f"LoRA {item.name!r} is {item.error}.")
            raise LoRAFileError(item.path, f"cannot be used: {item.error}")
        return item

    def _lora_folder(self, path: Path) -> Path:
        """The configured LoRA folder that holds `path` (as listed, symlinks not followed)."""
        for root in self.config.lora_dirs:
            if path.absolute().is_relative_to(Path(root).expanduser().absolute()):
                return Path(root).expanduser()
        raise PathRefused(f"{path} is not inside a LoRA folder ({', '.join(map(str, self.config.lora_dirs))}).")

    def save_lora_metadata(self, name: str, category: str | None, triggers: Sequence[str]) -> Path:
        """Write category/triggers to the LoRA's sidecar (its other keys kept), through the write policy of the LoRA's
        folder: only there, never through a symlink, atomically.

        Saving is the user's explicit edit of this library item, so the sidecar is rewritten even when it was
        written by hand (other keys are kept; YAML comments and layout are not). A sidecar that is a symlink, is not
        a regular file or cannot be read as a sidecar is refused and left as it is."""
        item = self.lora(name)
        existing = next((s for s in sidecar_paths(item.path) if s.exists() or s.is_symlink()), None)
        if existing is not None and (existing.is_symlink() or not existing.is_file()):
            raise LoRAFileError(existing, "the sidecar is a symlink or not a regular file; the UI does not write "
                                "through it.", "replace it by a plain file next to the LoRA.")
        data = read_sidecar(item.path) if existing else {}  # refuses a sidecar it cannot read
        if category:
            data["category"] = category
        data["triggers"] = [t for t in triggers if t]
        data = normalise_sidecar(data, existing or item.path)
        target = existing or item.path.with_suffix(".json")
        if target.suffix == ".json":
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        else:
            import yaml

            text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
        policy = WritePolicy.at(self._lora_folder(item.path), protected=[item.path, *self.config.model_roots])
        written = write_text(target, text, policy, what="sidecar", replace=True)  # the user's edit (see above)
        self._stale.add(item.name)
        self.library(refresh=True)
        return written

    def add_lora_file(self, upload: str | Path, original_name: str | None = None) -> LibraryItem:
        """Copy an uploaded .safetensors LoRA (checked first) into the first LoRA folder, through that folder's write
        policy. Never overwrites: a LoRA of that name, or a sidecar it would adopt, refuses the upload."""
        check_lora_upload(upload, int(self.config.max_lora_mb * 1e6), original_name)
        if not self.config.lora_dirs:
            raise SpecError("no LoRA folder is configured (--lora-dir)")
        folder = Path(self.config.lora_dirs[0]).expanduser()
        target = folder / safe_file_name(original_name or Path(upload).name, ".safetensors")
        for taken in (target, *sidecar_paths(target)):
            if taken.exists() or taken.is_symlink():
                raise LoRAFileError(taken, "already exists in the library; an upload never replaces a LoRA or its "
                                    "sidecar.", "rename the file before uploading it.")
        policy = WritePolicy.at(folder, protected=self.config.model_roots)
        write_file(target, lambda tmp: shutil.copyfile(upload, tmp), policy, what="LoRA", replace=False)
        self.library(refresh=True)
        return self.lora(target.stem)

    # --- previews -------------------------------------------------------------------------------------------
    def _preview_target(self, item: LibraryItem) -> Path:
        """Where the LoRA's preview is written: the preview it has when loraloom made it, else `name.png` beside it.
        A preview the user put there (not made by loraloom) is never replaced."""
        from loraloom.composition.files import loraloom_made

        current = item.preview
        if current is not None:
            if current.is_symlink() or not loraloom_made(current):
                raise LoRAFileError(current, "is a preview image that loraloom did not make; it is left as it is.",
                                    "move it away to let loraloom write the LoRA's preview.")
            return current if current.suffix.lower() == ".png" else item.path.with_name(item.path.stem + ".png")
        return item.path.with_name(item.path.stem + ".png")

    def set_preview(self, name: str, png: str | Path) -> Path:
        """Make a PNG of the output folder (`png`, with its spec) the preview image of LoRA `name`, written beside the
        LoRA through the write policy of its folder (never over a preview loraloom did not make)."""
        item = self.lora(name)
        source = resolve_inside(str(png), [self.config.output_dir], "image")
        if source.suffix.lower() != ".png" or not source.is_file():
            raise SpecError(f"{source.name} is not a PNG of the output folder. Fix: generate an image first")
        target = self._preview_target(item)
        policy = WritePolicy.at(self._lora_folder(item.path), protected=[item.path, *self.config.model_roots])
        written = write_file(target, lambda tmp: shutil.copyfile(source, tmp), policy, what="preview image")
        self.library(refresh=True)
        return written

    def preview_spec(self, name: str, model: str | None = None) -> GenerationSpec:
        """The spec of a LoRA's preview: the LoRA alone (merge, weight 1) on the form's default prompt (its
        `{triggers}` = the LoRA's trigger words; a prompt without the placeholder: the trigger words alone), seed 0,
        the form's default sampler settings."""
        prompt = self.config.prompt if "{triggers}" in (self.config.prompt or "") else "{triggers}"
        c = self.config
        return self.make_spec(model or c.models[0], prompt, c.negative_prompt, [[name, 1.0]], "merge",
                              dict(c.method_params.get("merge", {})), c.steps,
                              c.guidance_scale, c.height, c.width, c.scheduler, 0)

    # --- specs ----------------------------------------------------------------------------------------------
    def make_spec(self, model: str, prompt: str, negative_prompt: str, loras, method: str, method_params: dict | None,
                  steps: int, guidance_scale: float, height: int | None, width: int | None, scheduler: str,
                  seed: int, regions=None, base_weight: float | None = 0.0) -> GenerationSpec:
        """The GenerationSpec of a form (or API call). `loras`: [[name or path, weight], …] or [{name, weight, te, unet,
        lbw, start, stop, …}, …]. `<lora:name:w>` tags in the prompt choose and weight LoRAs (A1111's syntax, read by
        `prompt_tags`): a tag naming a library LoRA that `loras` lacks adds it; the tags leave the prompt.
        `regions`: [{mask, prompt, negative_prompt, loras, feather}, …] (docs/controls.md)."""
        model = self.resolve_model(model)
        entries = parse_lora_entries(loras)
        if has_tags(negative_prompt):
            raise SpecError("the negative prompt has a LoRA tag; LoRA tags are read from the prompt only (as A1111 "
                            "does). Fix: move the tag to the prompt, or remove it")
        _, tags = parse_tags(prompt or "", "prompt")
        for tag in tags:  # a tag may name a LoRA that no slot holds: it is chosen by the tag (weight from the tag)
            if not any(tag.name in (e.name, a1111_name(e.name)) for e in entries):
                entries.append(LoRAEntry(self.lora_for_tag(tag.name, tag.text).name))
        if not 1 <= len(entries) <= self.config.max_loras:
            raise SpecError(f"choose between 1 and {self.config.max_loras} LoRAs (got {len(entries)}). Fix: pick a LoRA in "
                            "a slot, or name one in the prompt as <lora:name:1>.")
        items = [(self.lora(e.name), e) for e in entries]
        if len({i.name for i, _ in items}) != len(items):
            twice = sorted({i.name for i, _ in items if sum(j.name == i.name for j, _ in items) > 1})
            raise SpecError(f"LoRA {', '.join(twice)} is chosen twice; pick each LoRA once (a prompt tag sets the "
                            "weight of a LoRA a slot holds).")
        if method_params is not None and not isinstance(method_params, dict):
            raise SpecError(f"method_params must be a JSON object of parameter names and values, got {method_params!r}")
        params = dict(method_params or {})
        try:  # unknown methods and parameter names (the known ones listed), values of the wrong type or range
            make_method(method, params)
        except LoraloomError:
            raise
        except (TypeError, ValueError) as err:
            raise SpecError(str(err)) from None
        for name, (value, writes) in path_values(method, params).items():
            # a file the method may write: inside the output folder (write policy); one it only reads: inside any of
            # the configured folders. Relative = inside the output folder; made absolute either way.
            what = f"{method}.{name}"
            params[name] = str(self.write_policy.resolve(value, what) if writes else
                               resolve_inside(value, [self.config.output_dir, *self.config.lora_dirs, *self.config.model_roots], what))
        refs = []
        for item, e in items:
            controls = dict(e.controls)
            if "mask" in controls:
                controls["mask"] = self._mask(controls["mask"], f"LoRA {item.name}")
            # category and trigger words as the library read them (what the page shows), so the file's header
            # and sidecar are not parsed again for every image
            known = {"triggers": list(item.info.triggers), "category": item.info.category} if item.info else {}
            try:
                refs.append(LoRARef(path=str(item.path), weight=e.weight, name=item.name, **{**known, **controls}))
            except TypeError as err:
                raise SpecError(f"LoRA {item.name}: {err}") from None
        refs = complete_lora_refs(refs)
        text, refs = apply_tags(prompt or "", refs, "prompt")
        region_refs = self._regions(regions)
        if seed is None or (isinstance(seed, (int, float)) and int(seed) == -1):
            seed = random_seed()
        if isinstance(seed, (int, float)) and not isinstance(seed, bool) and seed < 0:
            raise SpecError(f"seed must be 0 or more (or -1 for a random seed), got {seed:g}")
        if seed is None or seed == "":
            raise SpecError("seed is empty. Fix: a number")
        # steps and CFG left empty: the model family's (FLUX.1-dev 28 / 3.5, schnell 4 / 0, SD 3.5 28 / 3.5, SD 30 / 7.5)
        steps, guidance_scale = (None if v == "" else v for v in (steps, guidance_scale))
        return GenerationSpec(
            model=model, prompt=expand_prompt(text, refs), negative_prompt=negative_prompt or "",
            loras=refs, method=method, method_params=params, steps=_number(steps), guidance_scale=_number(guidance_scale),
            height=_number(height) if height else None, width=_number(width) if width else None, scheduler=scheduler,
            seed=_number(seed), dtype=self.config.dtype, regions=region_refs, base_weight=_number(base_weight or 0.0),
        )

    def lora_for_tag(self, name: str, tag: str) -> LibraryItem:
        """The library LoRA a prompt tag names (its library name, or that name as A1111 text writes it); a
        `SpecError` naming the closest names when there is none."""
        items = [i for i in self.library() if i.info is not None]
        for item in items:
            if name in (item.name, a1111_name(item.name)):
                return item
        names = [i.name for i in items]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5) or difflib.get_close_matches(
            name.lower(), [n.lower() for n in names], n=1, cutoff=0.0)
        hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
        raise SpecError(f"prompt: tag {tag}: no LoRA named {name!r} in the library.{hint} Fix: name a LoRA of the "
                        "library (the names in the LoRA slots' lists), e.g. <lora:" + (close[0] if close else "name") + ":1>")

    def _mask(self, mask, where: str):
        """A mask as a form or API call gives it: a named region or a box as it is; an image path inside the output or
        LoRA folders made absolute (a mask drawn in the page is saved in the output folder)."""
        if isinstance(mask, str) and mask.strip() and Path(mask.strip()).suffix:
            path = resolve_inside(mask.strip(), [self.config.output_dir, *self.config.lora_dirs], f"{where}: mask")
            return str(path)
        if isinstance(mask, dict) and isinstance(mask.get("image"), str):
            path = resolve_inside(mask["image"], [self.config.output_dir, *self.config.lora_dirs], f"{where}: mask")
            return {**mask, "image": str(path)}
        return mask

    def _regions(self, regions) -> list[RegionRef]:
        if regions in (None, "", []):
            return []
        if isinstance(regions, str):
            try:
                regions = json.loads(regions)
            except json.JSONDecodeError:
                raise SpecError(f"regions must be a JSON list of regions, got {regions!r}") from None
        if not isinstance(regions, list):
            raise SpecError(f"regions must be a list of regions such as [{{\"mask\": \"left\", \"prompt\": \"…\"}}], "
                            f"got {regions!r}")
        out = []
        for i, item in enumerate(regions):
            region = RegionRef.from_mapping(item, f"region {i + 1}")
            region.mask = self._mask(region.mask, f"region {i + 1}")
            out.append(region)
        return out

    def token_report(self, model: str, prompt: str, loras) -> tuple[str, bool]:
        """(Markdown, truncated?) saying how many tokens each text encoder reads of the prompt as it will be encoded
        (tags taken out, `{triggers}` expanded) and what it cuts off, trigger words named. ('', False) when the
        model's tokenizers are not at hand (a model that is not loaded and is not a diffusers folder)."""
        try:
            tokenizers = self.tokenizers(model)
            entries = parse_lora_entries(loras)
            text, tags = parse_tags(prompt or "", "prompt")
        except LoraloomError as err:
            return f"⚠ {err}", True
        if not tokenizers:
            return "", False
        lib = {i.name: i for i in self.library() if i.info is not None}
        names = [e.name for e in entries if e.name in lib]
        for tag in tags:
            names += [i.name for i in lib.values() if tag.name in (i.name, a1111_name(i.name)) and i.name not in names]
        triggers = [(t, n) for n in names for t in lib[n].triggers]
        text = text.replace("{triggers}", ", ".join(t for t, _ in triggers))
        return token_lines(tokenizers, text, triggers)

    def truncation(self, spec: GenerationSpec) -> str:
        """A warning when the text encoders cut off part of `spec`'s prompt (trigger words named), else ''."""
        try:
            tokenizers = self.tokenizers(spec.model)
        except LoraloomError:
            return ""
        triggers = [(t, r.adapter_name) for r in spec.loras for t in r.triggers]
        text, cut = token_lines(tokenizers, spec.prompt, triggers)
        return " · ".join(p for p in text.split(" · ") if p.startswith("⚠")) if cut else ""

    def tokenizers(self, model: str) -> list[tuple[str, Any]]:
        """[(label, tokenizer)] of `model`'s text encoders: the loaded pipeline's, else read from a diffusers folder."""
        model = self.resolve_model(model)
        cp = self.cache.pipeline
        if cp is not None and self.cache._key is not None and self.cache._key[0] == model:
            toks = [getattr(cp.pipe, name, None) for name in ("tokenizer", "tokenizer_2")]
        else:
            folder = Path(model)
            if not (folder / "model_index.json").is_file():
                return []
            key = str(folder)
            if key not in self._tokenizers:
                from transformers import CLIPTokenizer

                self._tokenizers[key] = [CLIPTokenizer.from_pretrained(str(folder / sub), local_files_only=True)
                                         for sub in ("tokenizer", "tokenizer_2") if (folder / sub).is_dir()]
            toks = self._tokenizers[key]
        toks = [t for t in toks if t is not None]
        if len(toks) == 1:
            return [("CLIP", toks[0])]
        return [(f"CLIP {k + 1}", t) for k, t in enumerate(toks)]

    # --- generation -----------------------------------------------------------------------------------------
    def generate(self, spec: GenerationSpec, callback: Callable | None = None,
                 cancel: threading.Event | None = None, owner: str | None = None) -> GenerationResult:
        """Generate and save one image (waits for the model). `callback(pipeline, step, timestep, kwargs)` per step;
        setting `cancel` stops after the current step and raises `Cancelled` (nothing is saved). `owner`: who asked
        (a page session), so that only they stop it (`interrupt`)."""
        cancel = cancel or threading.Event()

        steps = spec.steps or 0  # unset: the model family's, known once the model is loaded
        self.progress = (0, steps)

        def on_step(cp, i, t, kwargs):
            if cancel.is_set():
                cp.interrupt()
                return None
            total = int(spec.steps or cp.arch.default_steps)
            self.progress = (min(i + 1, total), total)
            return callback(cp, i, t, kwargs) if callback else None

        with self.lock:
            if cancel.is_set():
                raise Cancelled("stopped before it started")
            self._cancel, self._owner = cancel, owner
            try:
                cp = self.cache.get(spec)
                self._refresh_stale(cp)
                out = generate_image(cp, spec, self.config.output_dir, callback=on_step)
                if not cancel.is_set():  # the hashes of the bytes loaded, every parameter in effect (under the lock)
                    spec, provenance = self.cache.recorded(spec, out)
            finally:
                self._cancel, self._owner = None, None
        if cancel.is_set():
            done, total = self.progress or (0, steps)
            raise Cancelled(f"stopped at step {done}/{total}, nothing saved")
        image = out.images[0]
        path = save_png(image, spec.file_name(), spec, self.write_policy, provenance)
        return GenerationResult(path=path, image=image, spec=spec, seconds=out.seconds)

    def interrupt(self, owner: str | None = None) -> tuple[int, int] | None:
        """Stop the generation that holds the model now (if any, and if `owner` asked for it when given) after its
        current step; returns (steps done, steps) of that generation, or None when none was stopped."""
        if self._cancel is not None and (owner is None or owner == self._owner):
            self._cancel.set()
            return self.progress
        return None

    def _refresh_stale(self, cp) -> None:
        """A sidecar edited while the LoRA was resident: give the resident LoRA the new category/triggers."""
        for name in list(self._stale):
            if name in cp.loras:
                lora = cp.loras[name]
                lora.info = dataclasses.replace(read_lora_info(lora.info.path), name=lora.info.name)
            self._stale.discard(name)

    # --- scores ---------------------------------------------------------------------------------------------
    def clip_folder(self, model: str) -> str | None:
        """The CLIP that scores `model`'s images (`loraloom.evaluation.scoring`'s rule): the toy world's own CLIP for
        the shipped toy world, else the configured one (`--clip`); None: no CLIPScore."""
        if not self.config.clip:
            return None
        from loraloom.evaluation.scoring import is_toyworld_model

        if is_toyworld_model(model):
            from loraloom.evaluation import toyworld

            if Path(toyworld.CLIP).is_dir():
                return str(toyworld.CLIP)
        return self.config.clip

    def scorer(self, model: str):
        folder = self.clip_folder(model)
        if folder is None:
            return None
        with self._library_lock:
            if self._clip is None or self._clip[0] != folder:
                from loraloom.evaluation.clipscore import CLIPScorer

                self._clip = (folder, CLIPScorer.from_transformers(folder, device=self.config.device))
            return self._clip[1]

    def clip_score(self, result: GenerationResult) -> float | None:
        """CLIPScore of the image against its LoRAs' trigger words (the prompt when they have none); None without CLIP."""
        scores = self.clip_scores([result.image], [result.spec])
        return scores[0] if scores else None

    def clip_scores(self, images: list, specs: list[GenerationSpec]) -> list[float] | None:
        """CLIPScores of images against their specs' trigger words (as `loraloom eval`); None without a CLIP."""
        from loraloom.evaluation.scoring import clip_text

        if not specs:
            return []
        scorer = self.scorer(specs[0].model)
        if scorer is None:
            return None
        texts = [clip_text(s, "triggers") or s.prompt for s in specs]
        return [float(x) for x in scorer.score(images, texts)]

    def judge(self):
        """The MLLM judge configured for this UI (`UIConfig.judge`: {kind: openai|transformers, model, base_url,
        api_key_env, …}), built once; None when none is configured."""
        spec = self.config.judge
        if not spec:
            return None
        with self._library_lock:
            if self._judge is None:
                kind = spec.get("kind", "openai")
                if kind == "openai":
                    from loraloom.evaluation.judges.openai_chat import OpenAIChatJudge

                    self._judge = OpenAIChatJudge(spec["model"], base_url=spec.get("base_url", "https://api.openai.com/v1"),
                                                  api_key_env=spec.get("api_key_env", "OPENAI_API_KEY"),
                                                  timeout=float(spec.get("timeout", 120.0)),
                                                  max_retries=int(spec.get("retries", 3)))
                else:
                    from loraloom.evaluation.judges.local_vlm import TransformersVLMJudge

                    self._judge = TransformersVLMJudge(spec["model"], device=self.config.device)
            return self._judge

    def score(self, files: Sequence[str], use_judge: bool = True) -> tuple[list[list], list[list], str]:
        """Score images of the output folder (file names or paths inside it): CLIPScore each against its LoRAs'
        trigger words (`clip_scores`), and with a judge configured compare the images of one set and seed pairwise
        (ComposLoRA's protocol, as `loraloom eval --pairwise`). Returns (CLIPScore rows [file, method, seed,
        CLIPScore], judge rows [method a, method b, seed, per dimension a/b/outcome, error], note)."""
        from PIL import Image

        from loraloom.evaluation.scoring import GeneratedImage, comparison_pairs, method_label
        from loraloom.pipelines.spec import read_png_spec

        paths = []
        for f in dict.fromkeys(str(f) for f in files or [] if f):
            path = resolve_inside(f if "/" in f else str(self.config.output_dir / f), [self.config.output_dir], "image")
            if not path.is_file():
                raise SpecError(f"no image {Path(f).name!r} in the output folder")
            paths.append(path)
        if not paths:
            raise SpecError("no image to score. Fix: generate one first (or pick images in the History)")
        images = []
        for path in paths:
            try:
                images.append(GeneratedImage(path, read_png_spec(path)))
            except LoraloomError:
                continue  # a grid image or a PNG from elsewhere: not scored
        if not images:
            raise SpecError("none of these images carries a loraloom spec (X/Y/Z grids are scored per cell)")
        pics = []
        for img in images:
            with Image.open(img.path) as im:
                pics.append(im.convert("RGB"))
        scores = self.clip_scores(pics, [i.spec for i in images])
        clip_rows = [[i.path.name, method_label(i.spec), i.spec.seed, None if scores is None else round(scores[k], 2)]
                     for k, i in enumerate(images)]
        note = f"{len(images)} image(s) scored" + ("" if scores is not None else " (no CLIP configured: no CLIPScore)")
        judge_rows: list[list] = []
        judge = self.judge() if use_judge else None
        if judge is not None:
            from loraloom.evaluation.cache import JudgeCache
            from loraloom.evaluation.parsing import PAIRWISE_DIMENSIONS
            from loraloom.evaluation.protocols import ComposLoRAPairwise
            from loraloom.evaluation.scoring import run_pairwise

            pairs = comparison_pairs(images)
            if pairs:
                protocol = ComposLoRAPairwise(judge, JudgeCache(None))
                rows, _ = run_pairwise(pairs, protocol, root=self.config.output_dir)
                for r in rows:
                    judge_rows.append([r["method_a"], r["method_b"], r["seed"],
                                       *[r[f"{d}_{x}"] for d in PAIRWISE_DIMENSIONS for x in ("a", "b", "outcome")],
                                       r["error"] or ""])
                note += f"; judge {judge.model}: {len(pairs)} comparison(s)"
            else:
                note += "; the judge compares images of one prompt, LoRA set and seed made by different methods: none here"
        elif use_judge and self.config.judge is None:
            note += "; no MLLM judge configured (loraloom ui --judge …)"
        return clip_rows, judge_rows, note

    # --- PNG settings ---------------------------------------------------------------------------------------
    def restore(self, png: str | Path, original_name: str | None = None) -> Restored:
        """The settings a loraloom PNG carries, mapped onto this UI's models and library (the upload checked first).

        What can be restored is; what cannot is listed in `warnings` and left out: a model this UI does not offer,
        LoRAs not in the library, values of the wrong type (refused by `GenerationSpec`'s own checks, which check
        the method's parameters too, each named), and file parameters the UI's write policy (or folders) refuse."""
        label = original_name or Path(png).name
        path = check_png_upload(png, int(self.config.max_png_mb * 1e6), original_name)
        text = _png_spec_text(path, label)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"{label}: the '{SPEC_CHUNK}' metadata is not valid JSON ({err.msg}).") from None
        if not isinstance(data, dict):
            raise SpecError(f"{label}: the '{SPEC_CHUNK}' metadata is not a generation spec (a JSON object).")
        return self._restored(data, text)

    def _restored(self, data: dict, text: str) -> Restored:
        """`restore`'s mapping of a spec's data onto this UI (see there)."""
        spec, refused, refused_params, warnings = _checked_spec(data)
        self._check_param_paths(spec, refused_params, warnings)
        model = None
        if "model" not in refused:
            try:
                model = self.resolve_model(spec.model)
            except LoraloomError as err:
                warnings.append(f"base model not restored: {err}")
        loras = []
        for ref in spec.loras:
            item = self._find_lora(ref)
            if item is None:
                warnings.append(f"LoRA {ref.adapter_name!r} ({Path(ref.path).name}) is not in this library; left out.")
            else:
                loras.append((item.name, float(ref.weight)))
        entries = []
        for ref in spec.loras:
            item = self._find_lora(ref)
            if item is not None:
                entries.append(lora_entry(item.name, ref))
        return Restored(spec=spec, model=model, loras=loras, warnings=warnings, refused=refused,
                        refused_params=refused_params, text=text,
                        settings=settings_of(spec, model, entries, refused, refused_params))

    def from_output(self, name: str) -> tuple[Restored, list[str] | None]:
        """The settings of a PNG in the output folder (the History), as `restore` maps them, and for an X/Y/Z grid
        its axes (["method=merge,switch", "seed=0-3", None]); a grid's settings are its base spec's."""
        item = self.history.find(name)
        if item is None:
            raise SpecError(f"no image called {Path(str(name)).name!r} in the output folder. Fix: pick one from the "
                            "History (press Refresh)")
        if item.kind == "grid":
            base = item.data.get("base") or {}
            axes = [a.get("text") if isinstance(a, dict) else None for a in item.data.get("axes") or []]
            return self._restored(dict(base), json.dumps(item.data, sort_keys=True)), (axes + [None, None, None])[:3]
        return self._restored(dict(item.data), json.dumps(item.data, sort_keys=True)), None

    def import_png(self, png: str | Path, original_name: str | None = None) -> Restored:
        """The settings of a loraloom PNG (`restore`) or of a PNG with A1111's `parameters` text (A1111, Forge, …):
        prompt, negative prompt, steps, sampler, CFG, seed, size, model and LoRAs (by name, else by their A1111
        AutoV3 hash) are restored; what has no loraloom setting is listed in `warnings`."""
        from PIL import Image

        label = original_name or Path(png).name
        path = check_png_upload(png, int(self.config.max_png_mb * 1e6), original_name)
        try:
            with Image.open(path) as im:
                chunks = dict(getattr(im, "text", {}) or {})
        except (OSError, SyntaxError, ValueError) as err:
            raise SpecError(f"{label}: cannot be read as an image ({err}).") from None
        if chunks.get(SPEC_CHUNK):
            return self.restore(path, original_name)
        text = chunks.get(A1111_CHUNK)
        if not text:
            raise SpecError(f"{label}: has no '{SPEC_CHUNK}' metadata nor A1111 '{A1111_CHUNK}' text; it was not made by "
                            "loraloom nor by A1111 (or the metadata was stripped). Fix: drop a PNG that loraloom or A1111 "
                            "wrote.")
        imported = import_infotext(text, self._lora_by_a1111, self._model_by_a1111)
        settings = imported.settings
        method = settings.get("method")
        if method is not None and method not in available_methods():
            imported.warnings.append(f"method {method!r} is not available here; method left as it was.")
            settings.pop("method")
        spec = GenerationSpec(model=self.config.models[0], prompt=settings.get("prompt", ""))
        return Restored(spec=spec, model=settings.get("model"), loras=[(e["name"], e["weight"]) for e in settings["loras"]],
                        warnings=imported.warnings, text=text, settings=settings, source=imported.source)

    def _lora_by_a1111(self, name: str, autov3: str | None) -> str | None:
        """The library name of the LoRA an A1111 text names: by name (as A1111 writes it), else by AutoV3 hash."""
        usable = [i for i in self.library() if i.info is not None]
        for item in usable:
            if name in (item.name, a1111_name(item.name), item.path.stem):
                return item.name
        if autov3:
            for item in usable:
                if self._autov3(item.path) == autov3.lower():
                    return item.name
        return None

    def _model_by_a1111(self, name: str, model_hash: str | None) -> str | None:
        """A model this UI offers that an A1111 text names (by A1111's name of it, else by the AutoV2 of a file)."""
        from loraloom.pipelines.spec import a1111_model_name

        for model in self.model_choices():
            if name and name in (model, a1111_model_name(model)):
                return model
            p = Path(model)
            if model_hash and p.is_file() and self._digest(p).autov2 == model_hash.lower()[:10]:
                return model
        return None

    def _autov3(self, path: Path) -> str:
        return self._digest(path).autov3

    def _digest(self, path: Path):
        st = path.stat()
        key = ("digest", str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_digest(path)
        return self._hashes[key]

    def _check_param_paths(self, spec: GenerationSpec, refused: set[str], warnings: list[str]) -> None:
        """Drop (and list) the method's file parameters this UI would refuse: files the method writes outside what
        the write policy allows, files it reads outside the configured folders."""
        params = spec.method_params
        writes = written_paths(spec.method, params)
        reads = {k: v for k, (v, w) in path_values(spec.method, params).items() if not w and k not in writes}
        readable = [self.config.output_dir, *self.config.lora_dirs, *self.config.model_roots]
        for name, value in [*writes.items(), *reads.items()]:
            what = f"{spec.method}.{name}"
            try:
                self.write_policy.resolve(value, what) if name in writes else resolve_inside(value, readable, what)
            except (WriteRefused, PathRefused) as err:
                params.pop(name, None)
                refused.add(name)
                warnings.append(f"{what} not restored: {err}")

    def _find_lora(self, ref: LoRARef) -> LibraryItem | None:
        """The library LoRA a spec names: same file inside the LoRA folders, else same content hash, else same name."""
        usable = [i for i in self.library() if i.info is not None]
        try:
            path = resolve_inside(ref.path, self.config.lora_dirs, "LoRA")
            for item in usable:
                if item.path.resolve() == path:
                    return item
        except PathRefused:
            pass
        if ref.sha256:
            for item in usable:
                if self._sha256(item.path) == ref.sha256:
                    return item
        return next((i for i in usable if i.name == ref.adapter_name), None)

    def _sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]


def library_names(paths: Sequence[Path], roots: Sequence[Path]) -> list[str]:
    """One readable, unique name per LoRA file: its file name without the extension (`character_1`); when several
    files share that stem, the one nearest the top of the first LoRA folder keeps it and the others name their
    folder in brackets (`character_1 (kohya)`, the folder under the LoRA folder, else the LoRA folder's own name).
    The same name is used everywhere: slots, prompt tags, specs (the LoRA's adapter name), the PNG's A1111 text."""

    def place(path: Path) -> tuple[int, Path]:
        for k, root in enumerate(roots):
            root = Path(root).expanduser().absolute()
            if path.absolute().is_relative_to(root):
                return k, path.absolute().relative_to(root)
        return len(roots), Path(path.name)

    where = [place(Path(p)) for p in paths]
    names = [lora_name(p) for p in paths]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    for stem, members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda i: (where[i][0], len(where[i][1].parts), where[i][1].as_posix()))
        for i in members[1:]:
            k, rel = where[i]
            folder = rel.parent.as_posix() if rel.parent != Path(".") else (
                Path(roots[k]).name if k < len(roots) else "elsewhere")
            names[i] = f"{stem} ({folder})"
    taken: dict[str, int] = {}
    for i, name in enumerate(names):  # still the same (two roots whose folders share a name): number them
        if name in taken:
            taken[name] += 1
            names[i] = f"{name} ({taken[name]})"
        else:
            taken[name] = 1
    return names


def _png_spec_text(path: Path, label: str) -> str:
    """The spec JSON text in a PNG's `loraloom` chunk; errors name the file as the user knows it (`label`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.text.get(SPEC_CHUNK) if hasattr(im, "text") else None
    except (OSError, SyntaxError, ValueError) as err:
        raise SpecError(f"{label}: cannot be read as an image ({err}).") from None
    if not text:
        raise SpecError(f"{label}: has no '{SPEC_CHUNK}' metadata; it was not made by loraloom (or the metadata was "
                        "stripped). Fix: drop a PNG that loraloom wrote.")
    return text


_PROBE = {"model": "tiny:sd1", "prompt": ""}  # the least a spec needs, to check one field at a time


def _spec_or_error(data: dict) -> tuple[GenerationSpec | None, str | None]:
    """The spec of `data`, or the reason `GenerationSpec` refuses it (its checks name the field)."""
    try:
        return GenerationSpec.from_dict(data), None
    except (LoraloomError, TypeError, ValueError) as err:
        return None, str(err)


def _checked_spec(data: dict) -> tuple[GenerationSpec, set[str], set[str], list[str]]:
    """The spec of `data` (a PNG's JSON), keeping every value that passes `GenerationSpec`'s own checks (one field,
    one LoRA and one method parameter at a time when the whole does not pass). Returns (spec, refused fields,
    refused method parameters, warnings naming each)."""
    refused: set[str] = set()
    refused_params: set[str] = set()
    warnings: list[str] = []

    def refuse(name: str, why: str) -> None:
        refused.add(name)
        warnings.append(f"{name} not restored: {why}")

    known = {f.name for f in dataclasses.fields(GenerationSpec)}
    kept = {k: v for k, v in data.items() if k in known}
    for name in ("model", "prompt"):
        if name not in kept:
            refuse(name, f"the PNG's spec names no {name}")
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.append(f"unknown field(s) {unknown} ignored (from a newer loraloom?)")
    spec, _ = _spec_or_error({**_PROBE, **kept})
    if spec is None:  # find the values at fault, one field at a time, with the spec's own checks
        singles = {k: v for k, v in kept.items() if k not in ("loras", "method", "method_params")}
        for name, value in singles.items():
            _, err = _spec_or_error({**_PROBE, name: value})
            if err:
                refuse(name, err)
                kept.pop(name)
        if "method" in kept or "method_params" in kept:
            method_data = {k: kept[k] for k in ("method", "method_params") if k in kept}
            _, err = _spec_or_error({**_PROBE, "method": method_data.get("method", "merge")})
            if err:
                refuse("method", err)
                kept.pop("method", None)
                kept.pop("method_params", None)
            elif _spec_or_error({**_PROBE, **method_data})[1]:
                params = method_data.get("method_params")
                if not isinstance(params, dict):
                    refuse("method_params", f"method_params must map parameter names to values, got {params!r}")
                    kept.pop("method_params", None)
                else:
                    good = {}
                    for k, v in params.items():
                        _, err = _spec_or_error({**_PROBE, "method": kept["method"], "method_params": {k: v}})
                        if err:
                            refused_params.add(k)
                            warnings.append(f"{kept['method']}.{k} not restored: {err}")
                        else:
                            good[k] = v
                    kept["method_params"] = good
        if "loras" in kept:
            good_loras = []
            for i, entry in enumerate(kept["loras"] if isinstance(kept["loras"], list) else [kept["loras"]]):
                _, err = _spec_or_error({**_PROBE, "loras": [entry]})
                if err:
                    warnings.append(f"LoRA {i + 1} not restored: {err}")
                else:
                    good_loras.append(entry)
            kept["loras"] = good_loras
        spec = GenerationSpec.from_dict({**_PROBE, **kept})
    return spec, refused, refused_params, warnings


def token_lines(tokenizers, text: str, triggers: list[tuple[str, str]]) -> tuple[str, bool]:
    """(one line per text encoder: tokens read / its limit, and what it cuts off, trigger words named; truncated?)."""
    parts, cut_any = [], False
    for label, tok in tokenizers:
        limit = int(tok.model_max_length) - 2  # the start and end tokens take two places
        ids = tok(text, add_special_tokens=False, truncation=False)["input_ids"]
        line = f"{label}: {len(ids)}/{limit} tokens"
        if len(ids) > limit:
            cut_any = True
            kept = tok.decode(ids[:limit]).lower()
            lost = tok.decode(ids[limit:]).strip()
            lost_triggers = [f"{t} ({n})" for t, n in triggers if t.lower() in text.lower() and t.lower() not in kept]
            line = f"⚠ {line}: the text encoder cuts off “{lost[:120]}”"
            if lost_triggers:
                line += f"; trigger words lost: {', '.join(lost_triggers)}"
            line += ". Fix: a shorter prompt, or the trigger words first"
        parts.append(line)
    return " · ".join(parts), cut_any


def _number(value):
    """A form's number as the spec takes it: whole floats as int (spec checks name the field when it is no number)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_lora_entries(loras) -> list[LoRAEntry]:
    """`LoRAEntry`s from [[name, weight], …], [{"name": …, "weight": …, "te": …, …}, …] or ["name", …] (weight 1)."""
    if isinstance(loras, list) and any(isinstance(i, dict) for i in loras):
        out = []
        for item in loras:
            if not isinstance(item, dict):
                out.extend(parse_lora_entries([item]))
                continue
            unknown = sorted(set(item) - {"name", "weight", *LORA_CONTROLS})
            if "name" not in item or unknown:
                raise SpecError(f"bad LoRA entry {item!r}: " + (f"unknown key(s) {unknown}; known: name, weight, "
                                f"{', '.join(LORA_CONTROLS)}" if unknown else "it needs a name"))
            (name, weight), = parse_loras([[item["name"], item.get("weight", 1.0)]])
            controls = {k: item[k] for k in LORA_CONTROLS if k in item and item[k] is not None}
            out.append(LoRAEntry(name, weight, controls))
        return out
    return [LoRAEntry(n, w) for n, w in parse_loras(loras)]


def parse_loras(loras) -> list[tuple[str, float]]:
    """[[name, weight], …], [{"name": …, "weight": …}, …] or ["name", …] (weight 1) -> [(name, weight)]."""
    if loras is None or loras == "":
        return []
    if isinstance(loras, str):
        import json

        try:
            loras = json.loads(loras)
        except json.JSONDecodeError:
            raise SpecError(f"loras must be a JSON list such as [[\"name\", 1.0]], got {loras!r}") from None
    if not isinstance(loras, list):
        raise SpecError(f"loras must be a list of [name, weight] pairs, got {type(loras).__name__}")
    out = []
    for item in loras:
        if isinstance(item, str):
            name, weight = item, 1.0
        elif isinstance(item, dict) and "name" in item:
            name, weight = item["name"], item.get("weight", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, weight = item
        else:
            raise SpecError(f"bad LoRA entry {item!r}; use [name, weight]")
        try:
            out.append((str(name), float(weight)))
        except (TypeError, ValueError):
            raise SpecError(f"LoRA {name!r}: weight {weight!r} is not a number") from None
    return out
