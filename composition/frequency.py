"""CMLoRA's frequency profiling (Zou et al., ICLR 2025, arXiv 2502.04923): how much high-frequency content a LoRA
adds, measured on images it generates alone, and a small JSON cache so each LoRA is profiled once.

The statistic is the reference notebook's (`fft_analysis.ipynb`; docs/methods/cmlora.md#frequency-profile):
grey image -> centred 2-D FFT -> log magnitude -> mean over integer-radius rings -> normalised by its maximum
-> mean over radii >= h * r_max (h = 0.2: 72 of 362 px at 512²). The paper's ΔH is this score with the LoRA minus
the same score without it (same prompt and seeds).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .files import WritePolicy, loraloom_made, write_text
from .lora_file import file_sha256


def grey_uint8(image) -> np.ndarray:
    """PIL image / HWC uint8 array / HWC float array in [0, 1] -> (H, W) uint8, RGB averaged (as the notebook)."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr.mean(axis=-1)
    return arr.astype(np.uint8)


def radial_profile(grey: np.ndarray) -> np.ndarray:
    """Mean log-magnitude of the centred spectrum per integer radius r = floor(sqrt(dx² + dy²)), r = 0..r_max."""
    spectrum = np.fft.fftshift(np.fft.fft2(grey.astype(np.float64)))
    logmag = np.log(np.abs(spectrum) + 1e-8)
    h, w = grey.shape
    y, x = np.indices((h, w))
    r = np.floor(np.sqrt((x - w // 2) ** 2 + (y - h // 2) ** 2)).astype(np.int64)
    sums = np.bincount(r.ravel(), logmag.ravel())
    counts = np.bincount(r.ravel())
    return sums / np.maximum(counts, 1)


def high_frequency_score(image, h: float = 0.2) -> float:
    """Mean of the max-normalised radial profile over radii >= int(h * r_max) (docs/methods/cmlora.md#frequency-profile; h = 0.2)."""
    if not 0.0 <= h < 1.0:
        raise ValueError(f"high-frequency threshold h must be in [0, 1), got {h}")
    profile = radial_profile(grey_uint8(image))
    profile = profile / profile.max()
    cut = int(h * (len(profile) - 1))
    return float(profile[cut:].mean())


def partition_by_score(deltas: dict[str, float], threshold: float = 0.0) -> tuple[list[str], list[str]]:
    """CMLoRA's H/L split from measured ΔH: H = LoRAs that add high-frequency content (ΔH > threshold), L = the rest.
    Each part is ordered by ΔH, highest first (the highest-frequency LoRA leads)."""
    ranked = sorted(deltas, key=lambda n: -deltas[n])
    return [n for n in ranked if deltas[n] > threshold], [n for n in ranked if deltas[n] <= threshold]


# --- identities and the cache ---------------------------------------------------------------------------------
def lora_identity(lora) -> str:
    """sha256 of the LoRA file (or of its factors when it was built in memory)."""
    if lora.path is not None and Path(lora.path).is_file():
        return file_sha256(lora.path)
    from .merging import lora_fingerprint

    return "mem-" + lora_fingerprint(lora)


def model_fingerprint(unet: torch.nn.Module) -> str:
    """A cheap identity of a UNet: its config plus the bytes of its first and last convolutions."""
    h = hashlib.sha256()
    config = getattr(unet, "config", {})
    h.update(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=str).encode())
    for name in ("conv_in", "conv_out"):
        mod = getattr(unet, name, None)
        if mod is not None:
            h.update(mod.weight.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_folder() -> Path:
    """loraloom's cache folder: `$LORALOOM_CACHE`, else `$XDG_CACHE_HOME/loraloom`, else `~/.cache/loraloom`."""
    root = os.environ.get("LORALOOM_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "loraloom"


def default_cache_path() -> Path:
    """The frequency-profile cache in loraloom's cache folder."""
    return cache_folder() / "frequency_profiles.json"


class ProfileCache:
    """High-frequency scores keyed by (what was profiled, model, settings), in one small JSON file.

    Writes go through the write policy (atomic) and merge with what another process may have written meanwhile.
    `path=None` keeps the scores in memory only.
    """

    FORMAT = "loraloom-frequency-profiles/1"

    def __init__(self, path: str | os.PathLike | None, policy: WritePolicy | None = None):
        if policy is None and path is not None:  # a path of the caller's own: it may be written where it is
            path = Path(path).expanduser().resolve()
        self.policy = policy or WritePolicy.at(Path(path).parent if path is not None else ".")
        self.path = self.policy.resolve(path, "profile cache") if path is not None else None
        self.entries: dict[str, dict] = self._read()

    def _read(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}  # a damaged cache is only a cache: recompute
        return data.get("entries", {}) if isinstance(data, dict) else {}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = {**entry, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if self.path is None:
            return
        merged = {**self._read(), key: self.entries[key]}
        text = json.dumps({"format": self.FORMAT, "version": 1, "entries": merged}, indent=1, sort_keys=True) + "\n"
        write_text(self.path, text, self.policy, what="profile cache", replace=self._ours)
        self.entries = merged

    @classmethod
    def _ours(cls, path: Path) -> bool:
        """A cache file this class wrote (also before it carried `format`: {"version": 1, "entries": …})."""
        if loraloom_made(path):
            return True
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and set(data) == {"version", "entries"}


def profile_key(subject: str, model: str, settings: dict) -> str:
    """Cache key: the LoRA hash (or 'base'), the model fingerprint and a hash of the profiling settings."""
    s = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{subject}|{model}|{s}"
