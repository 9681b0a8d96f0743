"""Training LoRA.rar's merge hypernetwork on a folder of subject LoRAs and a folder of style LoRAs
(docs/methods/hypernet.md#training).

Per epoch one random (subject, style) pair from the training split; for each of its reference images
(max(#subject images, #style images) steps, batch 1, as the reference's per-pair dataset) the ZipLoRA loss
(`composition.merge_objective`) of the merged model whose coefficients the hypernetwork predicts; AdamW on the
hypernetwork only, lr 0.01 constant, lambda 0.01, grad-norm clip 1.0, 100 epochs (the reference's defaults).

Where the reference code (donaldssh/LoRA.rar `train_lorarar.py`) has a bug we do what the paper means: its style
prompt is always `--instance_prompt_2` ("a women in 3d rendering style"), whatever style was sampled
(docs/methods/hypernet.md#reference-code); here each style LoRA is trained on its own prompt. Its train/validation split file is not in the
repository; here validation LoRAs are held out by LoRA (`val_subjects`, `val_styles`), so every validation pair
is unseen, and the validation loss is measured on all held-out pairs at fixed noise and timesteps.

Reference images: the reference trains on each LoRA's training images. Give them with `images` (a sub-folder per
LoRA); for a LoRA without them, its references are generated with that LoRA alone on its own prompt (cached in the
work folder).

Everything is deterministic given the seed (pair choice, noise and t are seeded per epoch and step), checkpoints
are written every `checkpoint_every` epochs and training resumes from the last one. It drives a whole
`ComposedPipeline` (reference images, prompt encoding, the VAE), so it lives in `pipelines/`, not in `composition/`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loraloom.composition.errors import LoraloomError
from loraloom.composition.files import WritePolicy, write_file
from loraloom.composition.grad import frozen
from loraloom.composition.hypernetwork import DEFAULT_TARGETS, MergeHypernetwork, delta_rms, target_layers, widths_of
from loraloom.composition.merge_objective import PairBatchData, TrainableMerge, objective, own_prompt, training_scheduler

from .defaults import DEFAULTS
from .vae import to_unet_latents

log = logging.getLogger(__name__)
LORA_SUFFIXES = (".safetensors",)


@dataclass
class HypernetTrainConfig:
    epochs: int = 100  # one random pair per epoch (reference: 100)
    lr: float = 0.01
    lam: float = 0.01
    hidden: int = 128
    similarity: str = "cosine"
    clip: float = 1.0
    input_scale: float = 0.0  # 0 = 1 / RMS of the training deltas
    targets: tuple[str, ...] = DEFAULT_TARGETS
    images_per_lora: int = 4  # reference images generated per LoRA
    reference_steps: int = 25
    guidance_scale: float = DEFAULTS.guidance_scale
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    subject_prompt: str = ""  # template with {trigger}; empty: the sidecar's "prompt", else the trigger words
    style_prompt: str = ""
    images: str = ""  # folder with <lora file stem>/ sub-folders of training images (used instead of generated ones)
    val_subjects: list[str] | int = 2  # names, or how many to hold out (chosen with the seed)
    val_styles: list[str] | int = 2
    val_every: int = 10
    checkpoint_every: int = 10
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def find_loras(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraloomError(f"{folder}: not a folder of LoRA files.")
    paths = sorted(p for p in folder.rglob("*") if p.suffix in LORA_SUFFIXES and p.is_file())
    if not paths:
        raise LoraloomError(f"{folder}: no .safetensors LoRA files found.")
    return paths


def split_names(names: list[str], val: list[str] | int, seed: int, kind: str) -> tuple[list[str], list[str]]:
    """(train, validation) names; `val` = explicit names or a count drawn with the seed."""
    if isinstance(val, int):
        if not 0 <= val < len(names):
            raise LoraloomError(f"cannot hold out {val} of {len(names)} {kind} LoRAs for validation (need at least one to train on).")
        held = sorted(random.Random(f"{seed}-{kind}").sample(sorted(names), val))
    else:
        unknown = sorted(set(val) - set(names))
        if unknown:
            raise LoraloomError(f"validation {kind} LoRAs {unknown} are not in the {kind} folder (found: {sorted(names)}).")
        held = sorted(val)
    train = [n for n in names if n not in held]
    if not train:
        raise LoraloomError(f"every {kind} LoRA is held out for validation; keep at least one for training.")
    return train, held


class HypernetTrainer:
    """`HypernetTrainer(cp, subjects_dir, styles_dir, work_dir, config).train()` -> the trained network."""

    def __init__(self, cp, subjects: str | Path, styles: str | Path, work: str | Path, config: HypernetTrainConfig,
                 progress: bool = True):
        self.cp, self.cfg, self.progress = cp, config, progress
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.policy = WritePolicy.at(self.work, protected=[subjects, styles])  # the work folder the user named
        self.names = {"subject": [], "style": []}
        self.prompts: dict[str, str] = {}
        for kind, folder, template in (("subject", subjects, config.subject_prompt), ("style", styles, config.style_prompt)):
            for path in find_loras(folder):
                name = f"{kind}/{path.stem}"
                lora = cp.load_lora(path, name) if name not in cp.loras else cp.loras[name]
                self.names[kind].append(name)
                self.prompts[name] = own_prompt(lora, template)
        self.train_c, self.val_c = split_names(self.names["subject"], self._val(config.val_subjects, "subject"), config.seed, "subject")
        self.train_s, self.val_s = split_names(self.names["style"], self._val(config.val_styles, "style"), config.seed, "style")
        self.router = cp.routers["unet"]
        self.scheduler = training_scheduler(cp.pipe)
        self.latents: dict[str, torch.Tensor] = {}

    def _val(self, val, kind):
        return val if isinstance(val, int) else [v if v.startswith(f"{kind}/") else f"{kind}/{v}" for v in val]

    # --- data ------------------------------------------------------------------------------------------------
    def reference_latents(self) -> None:
        """Each LoRA's reference latents: its training images when `images/<file stem>/` has them (VAE-encoded),
        else images generated with the LoRA alone on its own prompt; cached in `work/references`."""
        from safetensors.torch import load_file, save_file

        folder = self.work / "references"
        folder.mkdir(exist_ok=True)
        cfg = self.cfg
        todo = self.names["subject"] + self.names["style"]
        bar = tqdm(todo, desc="reference images", disable=not self.progress, leave=False, dynamic_ncols=True)
        for name in bar:
            key = json.dumps({"prompt": self.prompts[name], "n": cfg.images_per_lora, "steps": cfg.reference_steps,
                              "cfg": cfg.guidance_scale, "neg": cfg.negative_prompt, "h": cfg.height, "w": cfg.width,
                              "seed": cfg.seed, "images": [str(p) for p in self._image_files(name)]}, sort_keys=True)
            file = folder / (name.replace("/", "__") + ".safetensors")
            if file.exists():
                from safetensors import safe_open

                with safe_open(str(file), "pt") as f:
                    if (f.metadata() or {}).get("key") == key:
                        self.latents[name] = load_file(str(file))["latents"].to(self.cp.device, self.cp.dtype)
                        continue
            given = self._image_files(name)
            if given:
                lat = self._encode_images(given)
            else:
                lat = torch.cat([self.cp(self.prompts[name], negative_prompt=cfg.negative_prompt, loras=[name], method="merge",
                                         method_params={"lora_scale": 1.0, "fuse": False}, num_inference_steps=cfg.reference_steps,
                                         guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width, seed=cfg.seed + i,
                                         output_type="latent", progress_bar=False).latents for i in range(cfg.images_per_lora)])
            meta = {"format": "loraloom-reference-latents/1", "key": key}
            tensors = {"latents": lat.float().cpu().contiguous()}
            write_file(file, lambda tmp, t=tensors, m=meta: save_file(t, str(tmp), metadata=m), self.policy,
                       what="reference latents", replace=True)
            self.latents[name] = lat

    def _image_files(self, name: str) -> list[Path]:
        if not self.cfg.images:
            return []
        folder = Path(self.cfg.images) / Path(self.cp.loras[name].path).stem
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) if folder.is_dir() else []

    @torch.no_grad()
    def _encode_images(self, files: list[Path]) -> torch.Tensor:
        """Training images -> latents as the UNet sees them (resized and centre-cropped to the model size)."""
        from PIL import Image, ImageOps

        h = self.cfg.height or self.cp.default_size
        w = self.cfg.width or self.cp.default_size
        vae = self.cp.pipe.vae
        out = []
        for f in files:
            img = ImageOps.fit(Image.open(f).convert("RGB"), (w, h), Image.Resampling.BICUBIC)
            x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
            z = to_unet_latents(vae, vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean)
            out.append(z.to(self.cp.dtype))
        return torch.cat(out)

    def pair_data(self, subject: str, style: str) -> PairBatchData:
        both = {subject: 1.0, style: 1.0}
        h = self.cfg.height or self.cp.default_size
        w = self.cfg.width or self.cp.default_size
        p_c, p_s = self.prompts[subject], self.prompts[style]
        with torch.no_grad():  # the prompts are fixed inputs of the objective
            _, pos = self.cp.encode_prompt_rows([p_c, p_s, p_c, p_s], [""] * 4, [{subject: 1.0}, {style: 1.0}, both, both], h, w)
        rows = [pos.rows(i, i + 1) for i in range(4)]
        return PairBatchData(subject, style, 1.0, 1.0, self.latents[subject], self.latents[style], *rows)

    # --- the network -----------------------------------------------------------------------------------------
    def build_network(self) -> MergeHypernetwork:
        loras = [self.cp.loras[n] for n in self.train_c + self.train_s]
        widths = widths_of([self.cp.loras[n] for n in self.names["subject"] + self.names["style"]], self.cfg.targets)
        scale = self.cfg.input_scale or 1.0 / delta_rms(loras, self.cfg.targets)
        torch.manual_seed(self.cfg.seed)
        return MergeHypernetwork(widths, self.cfg.hidden, scale, self.cfg.targets).to(self.cp.device)

    def step_loss(self, net, data: PairBatchData, merged: TrainableMerge, generator, index) -> dict[str, torch.Tensor]:
        subject, style = self.cp.loras[data.subject], self.cp.loras[data.style]
        coefs = {p: net.coefficients(subject.layers["unet"][p], style.layers["unet"][p]) for p in merged.sources}
        return objective(self.router.model, self.router, merged, data, coefs, self.scheduler, generator, self.cfg.lam,
                         self.cfg.similarity, index)

    def _merged(self, subject: str, style: str) -> TrainableMerge:
        c, s = self.cp.loras[subject], self.cp.loras[style]
        paths = target_layers(c, s, self.cfg.targets)
        if not paths:
            raise LoraloomError(f"{subject} and {style} share no {'/'.join(self.cfg.targets)} layer.")
        return TrainableMerge(self.router, "hypernet-train", c, s, paths)

    @torch.no_grad()
    def validation_loss(self, net) -> dict[str, float]:
        """Mean loss over every held-out (subject, style) pair, each image index once, at fixed noise and t."""
        totals: dict[str, float] = {}
        n = 0
        for i, subject in enumerate(self.val_c):
            for j, style in enumerate(self.val_s):
                data = self.pair_data(subject, style)
                with self._merged(subject, style) as merged:
                    for k in range(max(len(data.x_c), len(data.x_s))):
                        g = torch.Generator().manual_seed(_seed(self.cfg.seed, "val", i, j, k))
                        parts = self.step_loss(net, data, merged, g, (k, k))
                        for key, v in parts.items():
                            totals[key] = totals.get(key, 0.0) + float(v)
                        n += 1
        return {k: v / max(n, 1) for k, v in totals.items()}

    # --- training --------------------------------------------------------------------------------------------
    def train(self, out: str | Path | None = None) -> MergeHypernetwork:
        cfg = self.cfg
        started = time.perf_counter()
        self.reference_latents()
        net = self.build_network()
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        ckpt = self.work / "checkpoint.pt"
        state = {"epoch": 0, "history": [], "validation": [], "seconds": 0.0}
        if ckpt.exists():
            saved = torch.load(ckpt, map_location=self.cp.device, weights_only=True)
            if _resumable(saved["config"]) != _resumable(json.loads(json.dumps(cfg.to_dict()))) or saved["split"] != self.split():
                raise LoraloomError(f"{ckpt}: checkpoint of a run with other settings or LoRAs. Fix: use another --work "
                                    "folder, or delete it to start over.")
            net = MergeHypernetwork(**saved["net_config"]).to(self.cp.device)
            net.load_state_dict(saved["net"])
            opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
            opt.load_state_dict(saved["opt"])
            state = {k: saved[k] for k in state}
            log.info("resuming hypernetwork training at epoch %d", state["epoch"])
        net.train()
        unet = self.router.model
        seconds0 = state["seconds"]
        bar = tqdm(total=cfg.epochs, initial=state["epoch"], desc="hypernet", disable=not self.progress, dynamic_ncols=True)
        with frozen(unet), torch.enable_grad():
            for epoch in range(state["epoch"], cfg.epochs):
                rng = random.Random(_seed(cfg.seed, "pair", epoch))
                subject, style = rng.choice(self.train_c), rng.choice(self.train_s)
                data = self.pair_data(subject, style)
                with self._merged(subject, style) as merged:
                    for k in range(max(len(data.x_c), len(data.x_s))):
                        g = torch.Generator().manual_seed(_seed(cfg.seed, "step", epoch, k))
                        parts = self.step_loss(net, data, merged, g, (k, k))
                        opt.zero_grad(set_to_none=True)
                        parts["loss"].backward()
                        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
                        opt.step()
                        state["history"].append({"epoch": epoch, "subject": subject, "style": style,
                                                 **{key: float(v.detach()) for key, v in parts.items()}})
                state["epoch"] = epoch + 1
                postfix = {"loss": f"{state['history'][-1]['loss']:.4g}"}
                if cfg.val_every and (state["epoch"] % cfg.val_every == 0 or state["epoch"] == cfg.epochs):
                    net.eval()
                    val = self.validation_loss(net)
                    net.train()
                    state["validation"].append({"epoch": state["epoch"], **val})
                    postfix["val"] = f"{val['loss']:.4g}"
                bar.update(1)
                bar.set_postfix(postfix)
                state["seconds"] = seconds0 + time.perf_counter() - started
                if state["epoch"] % max(cfg.checkpoint_every, 1) == 0 or state["epoch"] == cfg.epochs:
                    self._checkpoint(ckpt, net, opt, state)
        bar.close()
        net.eval()
        self.state = state
        if out is not None:
            out = Path(out).expanduser().resolve()
            net.save(out, WritePolicy.at(out.parent).protecting(*self.policy.protected), self.summary(state))
        return net

    def split(self) -> dict:
        return {"train_subjects": self.train_c, "train_styles": self.train_s, "val_subjects": self.val_c, "val_styles": self.val_s}

    def summary(self, state) -> dict:
        hist = state["history"]
        last = hist[-min(len(hist), 20):]
        return {
            "config": self.cfg.to_dict(), **self.split(), "prompts": self.prompts, "epochs": state["epoch"],
            "steps": len(hist), "train_seconds": round(state["seconds"], 1),
            "train_loss_last20": sum(h["loss"] for h in last) / max(len(last), 1),
            "validation": state["validation"],
        }

    def _checkpoint(self, path: Path, net, opt, state) -> None:
        payload = {"net": net.state_dict(), "net_config": net.config(), "opt": opt.state_dict(), "config": self.cfg.to_dict(),
                   "split": self.split(), **state}
        # the trainer's own checkpoint name in its own work folder: replaced at every checkpoint
        write_file(path, lambda tmp: torch.save(payload, tmp), self.policy, what="checkpoint", replace=True)


def _resumable(config: dict) -> dict:
    """The settings a resumed run must share (more epochs, other validation/checkpoint intervals are fine)."""
    return {k: v for k, v in config.items() if k not in ("epochs", "val_every", "checkpoint_every")}


def _seed(*parts) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)

