"""The web UI's access to the engine: one model at a time behind a lock, the LoRA library, specs built from form
values, generation with per-step callbacks, CLIPScore, and settings read back from a PNG.

Everything here is plain Python (no Gradio), so it is tested and reused without a browser. Generation goes
through `pipelines.batch` (`PipelineCache`, `generate_image`, `complete_lora_refs`, `expand_prompt`) and
`pipelines.spec.save_png`, exactly as `loraloom generate` does: a PNG from the UI is one the CLI remakes.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraloom.composition.errors import LoRAFileError, LoraloomError, SpecError
from loraloom.composition.files import WritePolicy
from loraloom.composition.frequency import cache_folder
from loraloom.composition.library import scan_loras
from loraloom.composition.lora import LoRAInfo, read_lora_info
from loraloom.composition.lora_file import file_sha256
from loraloom.composition.metadata import sidecar_paths, write_sidecar
from loraloom.composition.methods import make_method
from loraloom.pipelines.batch import PipelineCache, complete_lora_refs, expand_prompt, generate_image
from loraloom.pipelines.spec import GenerationSpec, LoRARef, read_png_spec, save_png

from .config import TINY_MODELS, UIConfig
from .params import path_values
from .paths import PathRefused, is_inside, resolve_inside
from .uploads import check_lora_upload, check_png_upload, safe_file_name

log = logging.getLogger(__name__)


class Cancelled(LoraloomError):
    """The generation was stopped before its last step; nothing was saved."""


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
    """Settings read from a PNG, with the library names of its LoRAs and what could not be restored."""

    spec: GenerationSpec
    model: str | None
    loras: list[tuple[str, float]]
    warnings: list[str] = field(default_factory=list)


class GenerationService:
    """One model in memory at a time; one generation at a time (the lock), whatever calls in."""

    def __init__(self, config: UIConfig):
        self.config = config
        config.output_dir = Path(config.output_dir).expanduser().resolve()
        config.models = [str(Path(m).expanduser().resolve()) if Path(m).expanduser().exists() else m for m in config.models]
        self.cache = PipelineCache(device=config.device, local_files_only=config.local_files_only)
        self.lock = threading.Lock()
        self._library: list[LibraryItem] | None = None
        self._library_lock = threading.Lock()
        self._stale: set[str] = set()  # resident LoRAs whose sidecar changed
        self._hashes: dict[tuple, str] = {}
        self._clip = None
        self._cancel: threading.Event | None = None
        # Everything the UI writes for a generation stays in the output folder; model and LoRA folders are never written.
        self.write_policy = WritePolicy.at(config.output_dir, allowed=[cache_folder()],
                                           protected=[*config.lora_dirs, *config.model_roots])

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
        """A model the UI may load: a configured entry, a tiny model, or a path inside the model folders."""
        model = (model or "").strip()
        if model in self.config.models or model in TINY_MODELS:
            return str(Path(model).resolve()) if Path(model).exists() else model
        path = resolve_inside(model, self.config.model_roots, "model")
        if not path.exists():
            raise SpecError(f"model {model!r}: nothing there inside the model folders "
                            f"({', '.join(map(str, self.config.model_roots)) or 'none configured'}); hub ids and other "
                            "models are offered with `loraloom ui --model …`")
        return str(path)

    def pipeline(self, model: str):
        """Load (or keep) `model`; waits for a running generation."""
        spec = GenerationSpec(model=self.resolve_model(model), prompt="", dtype=self.config.dtype)
        with self.lock:
            return self.cache.get(spec)

    def geometry(self, model: str, load: bool = True) -> tuple[int, int]:
        """(default image side, the multiple sides must be) of `model`. Read from a diffusers folder's configs
        without loading it when `load` is False (so the page can answer while the model loads)."""
        folder = Path(self.resolve_model(model))
        if not load and (folder / "unet" / "config.json").exists() and (folder / "vae" / "config.json").exists():
            import json

            unet = json.loads((folder / "unet" / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
            scale = 2 ** (len(vae["block_out_channels"]) - 1)
            return int(unet["sample_size"]) * scale, scale * 2 ** (len(unet["block_out_channels"]) - 1)
        cp = self.pipeline(model)
        multiple = cp.pipe.vae_scale_factor * 2 ** (len(cp.pipe.unet.config.block_out_channels) - 1)
        return cp.default_size, int(multiple)

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
                item = LibraryItem(name=entry.path.stem, path=entry.path, info=entry.info, error=entry.error)
                if not is_inside(entry.path, roots):
                    item.info, item.error = None, "refused: a symlink that points outside the LoRA folders"
                else:
                    preview = entry.preview
                    item.preview = preview if preview is not None and is_inside(preview, roots) else None
                items.append(item)
        stems = [i.name for i in items]
        for item in items:  # the same file name in two folders: qualify both by their folder
            if stems.count(item.name) > 1:
                root = next(Path(r) for r in roots if item.path.absolute().is_relative_to(Path(r).absolute()))
                item.name = f"{root.name}/{item.path.absolute().relative_to(Path(root).absolute()).with_suffix('').as_posix()}"
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

    def save_lora_metadata(self, name: str, category: str | None, triggers: Sequence[str]) -> Path:
        """Write category/triggers to the LoRA's sidecar (inside the LoRA folders only)."""
        item = self.lora(name)
        for side in sidecar_paths(item.path):
            if side.exists() or side.is_symlink():
                resolve_inside(side, self.config.lora_dirs, "sidecar")
        target = write_sidecar(item.path, category=category or None, triggers=[t for t in triggers if t])
        self._stale.add(item.name)
        self.library(refresh=True)
        return target

    def add_lora_file(self, upload: str | Path, original_name: str | None = None) -> LibraryItem:
        """Copy an uploaded .safetensors LoRA (checked first) into the first LoRA folder; never overwrites."""
        check_lora_upload(upload, int(self.config.max_lora_mb * 1e6), original_name)
        if not self.config.lora_dirs:
            raise SpecError("no LoRA folder is configured (--lora-dir)")
        target = Path(self.config.lora_dirs[0]) / safe_file_name(original_name or Path(upload).name, ".safetensors")
        if target.exists() or target.is_symlink():
            raise LoRAFileError(target, "already exists in the library.", "rename the file before uploading it.")
        shutil.copyfile(upload, target)
        self.library(refresh=True)
        return self.lora(target.stem)

    # --- specs ----------------------------------------------------------------------------------------------
    def make_spec(self, model: str, prompt: str, negative_prompt: str, loras, method: str, method_params: dict | None,
                  steps: int, guidance_scale: float, height: int | None, width: int | None, scheduler: str,
                  seed: int) -> GenerationSpec:
        """The GenerationSpec of a form (or API call). `loras`: [[name or path, weight], …] or [{name, weight}, …]."""
        model = self.resolve_model(model)
        pairs = parse_loras(loras)
        if not 1 <= len(pairs) <= self.config.max_loras:
            raise SpecError(f"choose between 1 and {self.config.max_loras} LoRAs (got {len(pairs)}).")
        items = [(self.lora(name), weight) for name, weight in pairs]
        if len({i.name for i, _ in items}) != len(items):
            raise SpecError("the same LoRA is chosen twice; pick each LoRA once.")
        params = dict(method_params or {})
        make_method(method, params)  # unknown method or parameter names fail here, with the known ones listed
        for name, (value, writes) in path_values(method, params).items():
            # a file the method may write: inside the output folder (write policy); one it only reads: inside any of
            # the configured folders. Relative = inside the output folder; made absolute either way.
            what = f"{method}.{name}"
            params[name] = str(self.write_policy.resolve(value, what) if writes else
                               resolve_inside(value, [self.config.output_dir, *self.config.lora_dirs, *self.config.model_roots], what))
        refs = complete_lora_refs([LoRARef(path=str(i.path), weight=float(w), name=i.name) for i, w in items])
        if int(seed) < 0:
            raise SpecError(f"seed must be 0 or more, got {seed}")
        return GenerationSpec(
            model=model, prompt=expand_prompt(prompt or "", refs), negative_prompt=negative_prompt or "",
            loras=refs, method=method, method_params=params, steps=int(steps), guidance_scale=float(guidance_scale),
            height=int(height) if height else None, width=int(width) if width else None, scheduler=scheduler,
            seed=int(seed), dtype=self.config.dtype,
        )

    # --- generation -----------------------------------------------------------------------------------------
    def generate(self, spec: GenerationSpec, callback: Callable | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Generate and save one image (waits for the model). `callback(pipeline, step, timestep, kwargs)` per step;
        setting `cancel` stops after the current step and raises `Cancelled` (nothing is saved)."""
        cancel = cancel or threading.Event()

        def on_step(cp, i, t, kwargs):
            if cancel.is_set():
                cp.interrupt()
                return None
            return callback(cp, i, t, kwargs) if callback else None

        with self.lock:
            if cancel.is_set():
                raise Cancelled("stopped before it started")
            self._cancel = cancel
            try:
                cp = self.cache.get(spec)
                self._refresh_stale(cp)
                out = generate_image(cp, spec, self.config.output_dir, callback=on_step)
            finally:
                self._cancel = None
        if cancel.is_set():
            raise Cancelled("stopped; nothing was saved")
        image = out.images[0]
        spec = dataclasses.replace(spec, height=image.height, width=image.width)
        path = save_png(image, spec.file_name(), spec, self.write_policy)
        return GenerationResult(path=path, image=image, spec=spec, seconds=out.seconds)

    def interrupt(self) -> None:
        """Stop the generation that holds the model now (if any) after its current step."""
        if self._cancel is not None:
            self._cancel.set()

    def _refresh_stale(self, cp) -> None:
        """A sidecar edited while the LoRA was resident: give the resident LoRA the new category/triggers."""
        for name in list(self._stale):
            if name in cp.loras:
                lora = cp.loras[name]
                lora.info = dataclasses.replace(read_lora_info(lora.info.path), name=lora.info.name)
            self._stale.discard(name)

    # --- scores ---------------------------------------------------------------------------------------------
    def clip_score(self, result: GenerationResult) -> float | None:
        """CLIPScore of the image against its LoRAs' trigger words (the prompt when they have none); None without CLIP."""
        if not self.config.clip:
            return None
        from loraloom.evaluation.clipscore import CLIPScorer
        from loraloom.evaluation.scoring import clip_text

        if self._clip is None:
            self._clip = CLIPScorer.from_transformers(self.config.clip, device=self.config.device)
        text = clip_text(result.spec, "triggers") or result.spec.prompt
        return float(self._clip.score([result.image], [text])[0])

    # --- PNG settings ---------------------------------------------------------------------------------------
    def restore(self, png: str | Path, original_name: str | None = None) -> Restored:
        """The settings a loraloom PNG carries, mapped onto this UI's models and library (uploads checked first)."""
        path = check_png_upload(png, int(self.config.max_png_mb * 1e6), original_name)
        spec = read_png_spec(path)
        warnings: list[str] = []
        try:
            model = self.resolve_model(spec.model)
        except PathRefused as err:
            model = None
            warnings.append(f"base model not restored: {err}")
        loras = []
        for ref in spec.loras:
            item = self._find_lora(ref)
            if item is None:
                warnings.append(f"LoRA {ref.adapter_name!r} ({Path(ref.path).name}) is not in this library; left out.")
            else:
                loras.append((item.name, float(ref.weight)))
        return Restored(spec=spec, model=model, loras=loras, warnings=warnings)

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
