"""The web UI's access to the engine: one model at a time behind a lock, the LoRA library, specs built from form
values, generation with per-step callbacks, CLIPScore, and settings read back from a PNG.

Everything here is plain Python (no Gradio), so it is tested and reused without a browser. Generation goes
through `pipelines.batch` (`PipelineCache`, `generate_image`, `complete_lora_refs`, `expand_prompt`) and
`pipelines.spec.save_png`, exactly as `loraloom generate` does: a PNG from the UI is one the CLI remakes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from loraloom.composition.lora_file import file_sha256
from loraloom.composition.metadata import normalise_sidecar, read_sidecar, sidecar_paths
from loraloom.composition.methods import make_method, written_paths
from loraloom.pipelines.batch import PipelineCache, complete_lora_refs, expand_prompt, generate_image
from loraloom.pipelines.spec import SPEC_CHUNK, GenerationSpec, LoRARef, save_png

from .config import UIConfig
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
        remove_stale_temps(config.output_dir)  # half-written PNGs of a server that was killed

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
                if not cancel.is_set():  # the hashes of the bytes loaded, every parameter in effect (under the lock)
                    spec, provenance = self.cache.recorded(spec, out)
            finally:
                self._cancel = None
        if cancel.is_set():
            raise Cancelled("stopped; nothing was saved")
        image = out.images[0]
        path = save_png(image, spec.file_name(), spec, self.write_policy, provenance)
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
        return Restored(spec=spec, model=model, loras=loras, warnings=warnings, refused=refused,
                        refused_params=refused_params, text=text)

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
