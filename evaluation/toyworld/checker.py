"""The toy-world checker: a small CNN with one classification head per scene attribute, trained on the scene
generator's own labelled images (with blur, noise, colour and VAE round-trip augmentation, so that it also
reads generated images).

```py
checker = Checker.load("assets/toyworld/checker")
checker.predict([pil_image, ...])   # -> [{"shape": "star", "colour": "red", "background": "white", ...}, ...]
```
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .scenes import ATTRIBUTES, SIZE

HEADS = tuple(ATTRIBUTES)
WEIGHTS = "checker.safetensors"
CONFIG = "config.json"


class CheckerNet(nn.Module):
    """conv(32) x2 -> pool -> conv(64) x2 -> pool -> conv(128) -> pool -> fc(256) -> one linear head per attribute."""

    def __init__(self, widths=(32, 64, 128), hidden=256):
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=1), nn.BatchNorm2d(w1), nn.ReLU(),
            nn.Conv2d(w1, w1, 3, padding=1), nn.BatchNorm2d(w1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 3, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
            nn.Conv2d(w2, w2, 3, padding=1), nn.BatchNorm2d(w2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1), nn.BatchNorm2d(w3), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(w3 * (SIZE // 8) ** 2, hidden), nn.ReLU(), nn.Dropout(0.2))
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(ATTRIBUTES[a])) for a in HEADS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(self.features(x))
        return {a: head(h) for a, head in self.heads.items()}


def images_to_tensor(images) -> torch.Tensor:
    """PIL images, uint8 arrays (HWC or NHWC) or a float tensor in [-1, 1] -> float NCHW in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if arr.shape[1:3] != (SIZE, SIZE):
        raise ValueError(f"the toy-world checker reads {SIZE}x{SIZE} images, got {arr.shape[1]}x{arr.shape[2]}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Checker:
    """Which attribute values an image shows (argmax of each head)."""

    def __init__(self, net: CheckerNet, config: dict | None = None):
        self.net = net.eval()
        self.config = config or {}

    @classmethod
    def load(cls, folder: str | Path) -> Checker:
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / CONFIG).read_text())
        if config.get("attributes") != {k: list(v) for k, v in ATTRIBUTES.items()}:
            raise ValueError(f"{folder / CONFIG}: checker attributes do not match this version of the toy world; retrain it "
                             "with `loraloom toyworld train --stage checker`.")
        net = CheckerNet(tuple(config["widths"]), config["hidden"])
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
        net.load_state_dict(state)
        return cls(net, config)

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / WEIGHTS), metadata={"format": "loraloom-toyworld-checker/1"})
        config = {"attributes": {k: list(v) for k, v in ATTRIBUTES.items()}, **self.config, **(extra or {})}
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @torch.no_grad()
    def logits(self, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
        x = images_to_tensor(images)
        outs = [self.net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return {a: torch.cat([o[a] for o in outs]) for a in HEADS}

    def predict_indices(self, images) -> dict[str, np.ndarray]:
        return {a: l.argmax(1).numpy() for a, l in self.logits(images).items()}

    def predict(self, images) -> list[dict[str, str]]:
        idx = self.predict_indices(images)
        n = len(next(iter(idx.values())))
        return [{a: ATTRIBUTES[a][int(idx[a][i])] for a in HEADS} for i in range(n)]


def label_indices(scenes) -> dict[str, np.ndarray]:
    return {a: np.array([ATTRIBUTES[a].index(getattr(s, a)) for s in scenes]) for a in HEADS}


def augment(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Blur, noise, brightness/contrast and a 1-px shift: what a generated image does to a clean one."""
    n = x.shape[0]
    # Gaussian blur with a random sigma per image (3x3 kernel), on about half of the images.
    sigma = torch.rand(n, generator=g) * 0.9 * strength
    blur = torch.rand(n, generator=g) < 0.5
    k = torch.tensor([-1.0, 0.0, 1.0])
    w = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    w = w / w.sum(1, keepdim=True)
    kernel = (w[:, :, None] * w[:, None, :])  # (n, 3, 3)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    blurred = F.conv2d(xp.reshape(1, n * 3, SIZE + 2, SIZE + 2), kernel.repeat_interleave(3, 0)[:, None], groups=n * 3)
    x = torch.where(blur[:, None, None, None], blurred.reshape(n, 3, SIZE, SIZE), x)
    # brightness / contrast / per-channel gain
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.12 * strength
    bias = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.12 * strength
    x = x * gain + bias
    # additive noise, per image level
    level = torch.rand(n, 1, 1, 1, generator=g) * 0.08 * strength
    x = x + torch.randn(x.shape, generator=g) * level
    # a 1-px shift on a quarter of the images
    shift = torch.rand(n, generator=g) < 0.25
    if shift.any():
        dx, dy = [int(v) for v in torch.randint(-1, 2, (2,), generator=g)]
        x[shift] = torch.roll(x[shift], shifts=(dy, dx), dims=(2, 3))
    return x.clamp(-1, 1)
