"""The toy-world training stages: VAE, base model (UNet + text encoder), concept LoRAs, checker, tiny CLIP.

Each stage is deterministic (per-step seeded data and noise) and trains with the one `training.TrainingLoop`
(resume from the work folder, cosine learning rate, tqdm bar, checkpoints); it supplies its model, optimiser and
the loss of step k, and writes its final artefact into the assets folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import scenes as S
from .checker import Checker, CheckerNet, augment, label_indices
from .clipmodel import clip_captions
from .models import build_text_encoder, build_unet, build_vae, count_params, sample_scheduler, train_scheduler
from .recipe import Recipe
from .training import EMA, Checkpoint, ParamList, TrainingLoop, is_done, mark_done, step_generator, step_rng
from .vocab import write_tokenizer

log = logging.getLogger(__name__)

SEEDS = {"vae": 11, "base": 22, "checker": 33, "clip": 44, "lora": 55, "pool": 66}


class Paths:
    """Where a run keeps its checkpoints (`work`) and where the shipped artefacts go (`assets`); `model` names
    another base model folder than `<assets>/model` (LoRAs trained on the shipped model into a scratch folder)."""

    def __init__(self, work: str | Path, assets: str | Path, model: str | Path | None = None):
        self.work = Path(work)
        self.assets = Path(assets)
        self._model = Path(model) if model is not None else None

    tokenizer = property(lambda self: self.work / "tokenizer")
    vae = property(lambda self: self.work / "vae")
    base = property(lambda self: self.work / "base")
    checker_work = property(lambda self: self.work / "checker")
    clip_work = property(lambda self: self.work / "clip")
    model = property(lambda self: self._model or self.assets / "model")
    loras = property(lambda self: self.assets / "loras")
    checker = property(lambda self: self.assets / "checker")
    clip = property(lambda self: self.assets / "clip")

    def lora_work(self, lora_id: str) -> Path:
        return self.work / "loras" / lora_id

    def stage_work(self) -> dict[str, Path]:
        """Each trained stage's checkpoint folder (the LoRAs' holds one folder per LoRA)."""
        return {"vae": self.vae, "clip": self.clip_work, "base": self.base, "checker": self.checker_work,
                "loras": self.work / "loras"}

    def trained_vae(self) -> Path:
        """The VAE the base model and the checker are trained against: this run's fp32 checkpoint or, when a later
        stage is retrained on its own against shipped assets (`--stage checker` in a fresh work folder), the
        shipped fp16 VAE in the model folder."""
        for folder in (self.vae / "final", self.model / "vae"):
            if (folder / "config.json").exists():
                return folder
        raise FileNotFoundError(f"no trained VAE in {self.vae / 'final'} or {self.model / 'vae'}: "
                                "train it first (`loraloom toyworld train --stage vae`)")


# --- tokenizer -------------------------------------------------------------------------------------------
def stage_tokenizer(paths: Paths, recipe: Recipe):
    from transformers import CLIPTokenizer

    from .vocab import check_single_tokens

    if (paths.tokenizer / "tokenizer_config.json").exists():
        tok = CLIPTokenizer.from_pretrained(paths.tokenizer)
        try:
            check_single_tokens(tok, S.vocabulary_words())
            return tok
        except ValueError:
            shutil.rmtree(paths.tokenizer)  # written for another vocabulary
    return write_tokenizer(paths.tokenizer, S.vocabulary_words(), max_length=16)


def image_batch(scenes_) -> torch.Tensor:
    return S.to_tensor_batch(S.render_batch(scenes_))


# --- VAE -------------------------------------------------------------------------------------------------
def vae_step(vae, recipe: Recipe, step: int) -> dict[str, torch.Tensor]:
    """Step k of the VAE: a fresh batch of any scenes; MSE + L1 + a tiny KL on a sampled latent."""
    rng = step_rng(SEEDS["vae"] + recipe.seed, step)
    x = image_batch([S.sample_any_scene(rng) for _ in range(recipe.vae_batch)])
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=step_generator(SEEDS["vae"], step))
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec, x)
    return {"loss": mse + 0.5 * F.l1_loss(rec, x) + recipe.vae_kl * post.kl().mean(), "mse": mse}


@torch.no_grad()
def save_vae(vae, paths: Paths) -> None:
    """Scaling factor = 1 / std of the latents (of 512 fixed scenes); the VAE goes to `<work>/vae/final`."""
    rng = np.random.default_rng(SEEDS["vae"] + 1000)
    x = image_batch([S.sample_any_scene(rng) for _ in range(512)])
    post = vae.encode(x).latent_dist
    std = float(post.mean.std())
    mse = float(F.mse_loss(vae.decode(post.mean).sample, x))
    vae.register_to_config(scaling_factor=round(1.0 / std, 5), force_upcast=False)
    vae.save_pretrained(paths.vae / "final")
    mark_done(paths.vae, {"recon_mse": mse, "latent_std": std, "params": count_params(vae)})


def stage_vae(paths: Paths, recipe: Recipe, progress: bool = True):
    """AutoencoderKL on all scenes: MSE + L1 + a tiny KL; scaling factor = 1 / std of the latents."""
    from diffusers import AutoencoderKL

    if not is_done(paths.vae):
        vae = build_vae(recipe.seed)
        opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
        loop = TrainingLoop("toyworld vae", paths.vae, recipe.vae_steps, opt, list(vae.parameters()),
                            {"model": vae, "opt": opt}, recipe.vae_lr, warmup=50,
                            checkpoint_every=recipe.checkpoint_every, shown="mse")
        vae.train()
        loop.run(partial(vae_step, vae, recipe), progress)
        save_vae(vae.eval(), paths)
    return AutoencoderKL.from_pretrained(paths.vae / "final")


# --- checker ---------------------------------------------------------------------------------------------
def scene_pool(n: int, seed: int, cache: Path | None = None, p_concept: float = 0.5, progress: bool = True):
    """`n` scenes from the whole world and their images (cached as .npz in the work folder)."""
    if cache is not None and cache.exists():
        data = np.load(cache, allow_pickle=False)
        scenes_ = [S.Scene(**json.loads(s)) for s in data["scenes"]]
        return scenes_, data["images"]
    rng = np.random.default_rng(seed)
    scenes_ = [S.sample_any_scene(rng, p_concept) for _ in range(n)]
    images = np.stack([S.render(s) for s in tqdm(scenes_, desc="render scenes", mininterval=2.0, leave=False, disable=not progress)])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, scenes=np.array([json.dumps(s.to_dict()) for s in scenes_]), images=images)
        tmp.replace(cache)
    return scenes_, images


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = S.to_tensor_batch(images[i : i + batch])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def checker_accuracy(checker: Checker, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on fresh, clean generator images."""
    rng = np.random.default_rng(seed)
    scenes_ = [S.sample_any_scene(rng) for _ in range(n)]
    pred = checker.predict_indices(S.render_batch(scenes_))
    truth = label_indices(scenes_)
    return {a: float((pred[a] == truth[a]).mean()) for a in truth}


def augmented_batch(x_all: torch.Tensor, batch: int, g: torch.Generator, strength: float = 1.0):
    """(indices, augmented images) of `batch` random pool images, all drawn from `g` (checker and CLIP steps)."""
    idx = torch.randint(0, len(x_all), (batch,), generator=g)
    return idx, augment(x_all[idx].clone(), g, strength)


def checker_data(paths: Paths, recipe: Recipe, vae=None, progress: bool = True):
    """(images, labels) the checker trains on: the scene pool, its first `checker_vae_share` through the VAE."""
    scenes_, images = scene_pool(recipe.checker_pool, SEEDS["pool"] + recipe.seed, paths.checker_work / "pool.npz",
                                progress=progress)
    n_vae = int(len(images) * recipe.checker_vae_share) if vae is not None else 0
    if n_vae:
        images = images.copy()
        images[:n_vae] = vae_round_trip(vae, images[:n_vae])
    return S.to_tensor_batch(images), {a: torch.from_numpy(v) for a, v in label_indices(scenes_).items()}


def checker_step(net, x_all: torch.Tensor, y_all: dict, recipe: Recipe, step: int) -> dict[str, torch.Tensor]:
    """Step k of the checker: augmented pool images, label-smoothed cross-entropy summed over the attributes."""
    idx, x = augmented_batch(x_all, recipe.checker_batch, step_generator(SEEDS["checker"] + recipe.seed, step))
    out = net(x)
    return {"loss": sum(F.cross_entropy(out[a], y_all[a][idx], label_smoothing=0.05) for a in out)}


def stage_checker(paths: Paths, recipe: Recipe, vae=None, progress: bool = True) -> Checker:
    if is_done(paths.checker_work) and (paths.checker / "config.json").exists():
        return Checker.load(paths.checker)
    x_all, y_all = checker_data(paths, recipe, vae, progress)
    torch.manual_seed(SEEDS["checker"] + recipe.seed)
    net = CheckerNet(tuple(recipe.checker_widths), recipe.checker_hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.checker_lr, weight_decay=1e-4)
    loop = TrainingLoop("toyworld checker", paths.checker_work, recipe.checker_steps, opt, list(net.parameters()),
                        {"model": net, "opt": opt}, recipe.checker_lr, warmup=50, final_lr=0.02,
                        checkpoint_every=recipe.checkpoint_every * 2, clip_norm=None, digits=3)
    net.train()
    loop.run(partial(checker_step, net, x_all, y_all, recipe), progress)
    checker = Checker(net.eval(), {"widths": list(recipe.checker_widths), "hidden": recipe.checker_hidden})
    acc = checker_accuracy(checker)
    checker.save(paths.checker, {"accuracy_clean": acc, "params": count_params(net)})
    checker = Checker.load(paths.checker)  # what ships (fp16-rounded weights)
    mark_done(paths.checker_work, {"accuracy_clean": checker_accuracy(checker)})
    return checker


# --- base model ------------------------------------------------------------------------------------------
def base_captions(scenes_, rng: np.random.Generator, dropout: float, omit: float) -> list[str]:
    out = []
    for s in scenes_:
        u, v = rng.random(), rng.random()
        out.append("" if u < dropout else S.caption(s, background=v >= omit))
    return out


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_latents(vae, scenes_, g: torch.Generator) -> torch.Tensor:
    post = vae.encode(image_batch(scenes_)).latent_dist
    eps = torch.randn(post.mean.shape, generator=g)
    return (post.mean + post.std * eps) * vae.config.scaling_factor


class LatentPool:
    """Scenes and their VAE posteriors, rendered and encoded once; each draw samples a fresh latent.

    Rendering and encoding every batch anew costs about a sixth of a training step on this CPU.
    """

    def __init__(self, scenes_: list, mean: torch.Tensor, std: torch.Tensor, scaling: float):
        self.scenes, self.mean, self.std, self.scaling = scenes_, mean, std, scaling

    @classmethod
    @torch.no_grad()
    def build(cls, vae, scenes_: list, batch: int = 256) -> LatentPool:
        means, stds = [], []
        for i in range(0, len(scenes_), batch):
            post = vae.encode(image_batch(scenes_[i : i + batch])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        return cls(scenes_, torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor))

    def __len__(self) -> int:
        return len(self.scenes)

    def draw(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        eps = torch.randn((len(idx), *self.mean.shape[1:]), generator=g)
        return (self.mean[idx] + self.std[idx] * eps) * self.scaling


def v_loss(unet, sched, z, enc, g: torch.Generator, n_total: int, rows: slice, timestep_power: float = 1.0) -> torch.Tensor:
    """Plain MSE on the v target. Timesteps t = T * u ** power, u uniform: power 1 is uniform (so t = T, where the
    prompt alone must decide, counts as much as any); power < 1 favours the noisy steps that decide layout."""
    noise = torch.randn((n_total, *z.shape[1:]), generator=g)[rows]
    T = sched.config.num_train_timesteps
    if timestep_power == 1.0:
        t = torch.randint(0, T, (n_total,), generator=g)[rows]
    else:
        t = (T * torch.rand((n_total,), generator=g) ** timestep_power).long().clamp_(0, T - 1)[rows]
    noisy = sched.add_noise(z, noise, t)
    target = sched.get_velocity(z, noise, t)
    pred = unet(noisy, t, enc, return_dict=False)[0]
    return F.mse_loss(pred, target)


def trained_token_ids(tokenizer, words) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(w + "</w>") for w in words]


@torch.no_grad()
def init_trigger_embeddings(text_encoder, tokenizer, seed: int) -> None:
    """Give the never-seen trigger tokens random embeddings at the scale of the trained word embeddings.

    Left at their tiny initialisation they would all look alike next to the position embeddings, so one
    LoRA could not tell its trigger from another's (real vocabularies have rare tokens of normal scale).
    """
    emb = text_encoder.get_input_embeddings().weight
    base_words = [w for w in S.vocabulary_words() if w not in {l.trigger for l in S.LORAS}]
    trained = emb[trained_token_ids(tokenizer, base_words)]
    mean, std = trained.mean(0), trained.std(0)
    g = torch.Generator().manual_seed(seed)
    ids = trained_token_ids(tokenizer, [l.trigger for l in S.LORAS])
    emb[ids] = mean + std * torch.randn((len(ids), emb.shape[1]), generator=g)


def base_step(step: int, *, unet, te, tokenizer, sched, pool: LatentPool, recipe: Recipe, rank: int,
              world: int) -> dict[str, torch.Tensor]:
    """Step k of the base model: process `rank`'s rows of one batch drawn for all processes alike (scenes,
    captions, timesteps, noise), with latents sampled from its own generator."""
    B = recipe.base_batch
    rows = slice(rank * B // world, (rank + 1) * B // world)
    seed = SEEDS["base"] + recipe.seed
    rng, g = step_rng(seed, step), step_generator(seed, step)
    idx = torch.from_numpy(rng.integers(0, len(pool), B))
    caps = base_captions([pool.scenes[i] for i in idx.tolist()], rng, recipe.caption_dropout, recipe.background_omit)
    z = pool.draw(idx[rows], step_generator(seed + rank + 1, step))
    enc = te(tokenize(tokenizer, caps[rows]))[0]
    return {"loss": v_loss(unet, sched, z, enc, g, B, rows)}


def _base_worker(rank: int, world: int, paths: Paths, recipe: Recipe, progress: bool) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(paths.tokenizer)
    vae = AutoencoderKL.from_pretrained(paths.trained_vae()).eval().requires_grad_(False)
    unet = build_unet(recipe.seed)
    te = build_text_encoder(tokenizer, recipe.seed)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.base_lr, weight_decay=0.01)
    ema = EMA(params, recipe.base_ema)
    loop = TrainingLoop("toyworld base", paths.base, recipe.base_steps, opt, params,
                        {"unet": unet, "te": te, "opt": opt, "ema": ema}, recipe.base_lr, recipe.base_warmup,
                        checkpoint_every=recipe.checkpoint_every, ema=ema, rank=rank, world=world)
    unet.train()
    te.train()
    pool_rng = np.random.default_rng([SEEDS["base"] + recipe.seed, 999])
    pool = LatentPool.build(vae, [S.sample_scene(pool_rng) for _ in range(recipe.base_pool)])
    step = partial(base_step, unet=unet, te=te, tokenizer=tokenizer, sched=train_scheduler(), pool=pool, recipe=recipe,
                   rank=rank, world=world)
    loop.run(step, progress)


def save_pipeline(folder: Path, unet, te, tokenizer, vae, dtype=torch.float16) -> None:
    """A plain diffusers `StableDiffusionPipeline` folder (fp16 safetensors; no safety checker)."""
    import copy

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(te), tokenizer=tokenizer, unet=copy.deepcopy(unet),
        scheduler=sample_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def stage_base(paths: Paths, recipe: Recipe, progress: bool = True) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from .training import launch

    if is_done(paths.base) and (paths.model / "model_index.json").exists():
        return
    if not (Checkpoint(paths.base).exists() and Checkpoint(paths.base).load()["step"] >= recipe.base_steps):
        launch(_base_worker, recipe.workers, (paths, recipe, progress), paths.work / "dist_init")
    state = Checkpoint(paths.base).load()
    tokenizer = CLIPTokenizer.from_pretrained(paths.tokenizer)
    vae = AutoencoderKL.from_pretrained(paths.trained_vae())
    unet = build_unet(recipe.seed)
    te = build_text_encoder(tokenizer, recipe.seed)
    unet.load_state_dict(state["unet"])
    te.load_state_dict(state["te"])
    ema = EMA(list(unet.parameters()) + list(te.parameters()), recipe.base_ema)
    ema.load_state_dict(state["ema"])
    ema.copy_to(list(unet.parameters()) + list(te.parameters()))
    init_trigger_embeddings(te, tokenizer, SEEDS["base"] + recipe.seed + 1)
    save_pipeline(paths.model, unet.eval(), te.eval(), tokenizer, vae.eval())
    mark_done(paths.base, {"steps": state["step"], "unet_params": count_params(unet), "text_encoder_params": count_params(te)})


# --- concept LoRAs ---------------------------------------------------------------------------------------
def load_model_parts(model_folder: Path, dtype=torch.float32):
    """(unet, text_encoder, tokenizer, vae) of the saved base pipeline, frozen, in `dtype`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_folder = Path(model_folder)
    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet", torch_dtype=dtype)
    te = CLIPTextModel.from_pretrained(model_folder / "text_encoder", torch_dtype=dtype)
    tok = CLIPTokenizer.from_pretrained(model_folder / "tokenizer")
    vae = AutoencoderKL.from_pretrained(model_folder / "vae", torch_dtype=dtype)
    for m in (unet, te, vae):
        m.eval().requires_grad_(False)
    return unet, te, tok, vae


def lora_configs(recipe: Recipe) -> dict:
    from peft import LoraConfig

    cfgs = {"unet": LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, init_lora_weights="gaussian",
                               target_modules=list(recipe.lora_targets))}
    if recipe.lora_text_encoder:
        cfgs["text_encoder"] = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, init_lora_weights="gaussian",
                                          target_modules=list(recipe.lora_te_targets))
    return cfgs


def lora_pools(vae, spec: S.ConceptLoRA, recipe: Recipe, seed: int) -> tuple[LatentPool, LatentPool]:
    """(positives: base scenes showing the concept, prior scenes without it: see `Recipe.lora_prior_kind`), encoded once."""
    rng = np.random.default_rng([seed, 999])
    pos_scenes = [S.lora_scene(rng, spec) for _ in range(recipe.lora_pool)]
    if recipe.lora_prior_kind == "paired":
        prior_scenes = [S.without_concept(s, spec, rng) for s in pos_scenes]
    elif recipe.lora_prior_kind == "random":
        prior_scenes = [S.sample_scene(rng) for _ in range(recipe.lora_pool)]
    else:
        raise ValueError(f"lora_prior_kind must be 'random' or 'paired', not {recipe.lora_prior_kind!r}")
    return LatentPool.build(vae, pos_scenes), LatentPool.build(vae, prior_scenes)


def lora_batch(pools: tuple[LatentPool, LatentPool], rng: np.random.Generator, g: torch.Generator, batch: int,
               prior: float, omit: float) -> tuple[torch.Tensor, list[str]]:
    """Latents and captions of one LoRA step: positives (concept + trigger) then prior-preservation base scenes
    with their base captions (which keeps the LoRA from acting without its trigger)."""
    n_prior = int(round(batch * prior))
    pos, base = pools
    i_pos = torch.from_numpy(rng.integers(0, len(pos), batch - n_prior))
    i_base = torch.from_numpy(rng.integers(0, len(base), n_prior))
    scenes_ = [pos.scenes[i] for i in i_pos.tolist()] + [base.scenes[i] for i in i_base.tolist()]
    caps = [S.caption(s, background=rng.random() >= omit) for s in scenes_]
    z = torch.cat([pos.draw(i_pos, g), base.draw(i_base, g)])
    return z, caps


def add_lora_adapters(unet, te, cfgs: dict) -> list[torch.Tensor]:
    """Inject the LoRA layers of `cfgs` (drawing their initial weights from torch's global generator); the
    trainable parameters, UNet's first."""
    unet.add_adapter(cfgs["unet"])
    if "text_encoder" in cfgs:
        # peft directly: transformers' `add_adapter` insists on a newer peft than diffusers needs
        from peft import inject_adapter_in_model

        inject_adapter_in_model(cfgs["text_encoder"], te)
    return [p for m in (unet, te) for p in m.parameters() if p.requires_grad]


def lora_step(step: int, *, unet, te, tokenizer, sched, pools: tuple[LatentPool, LatentPool], recipe: Recipe,
              seed: int) -> dict[str, torch.Tensor]:
    """Step k of one LoRA: positives and prior scenes (`lora_batch`), v-prediction loss; the text encoder is in
    the graph only when it has LoRA layers."""
    B = recipe.lora_batch
    rng, g = step_rng(seed, step), step_generator(seed, step)
    z, caps = lora_batch(pools, rng, step_generator(seed + 1, step), B, recipe.lora_prior, recipe.lora_background_omit)
    with torch.set_grad_enabled(recipe.lora_text_encoder):
        enc = te(tokenize(tokenizer, caps))[0]
    return {"loss": v_loss(unet, sched, z, enc, g, B, slice(0, B), recipe.lora_timestep_power)}


def save_lora(out: Path, unet, te, cfgs: dict, spec: S.ConceptLoRA, recipe: Recipe) -> None:
    """The trained adapters as one LoRA file with its sidecar (`lora_io.save_peft_lora`)."""
    from peft.utils import get_peft_model_state_dict

    from .lora_io import save_peft_lora

    states = {"unet": get_peft_model_state_dict(unet)}
    if "text_encoder" in cfgs:
        states["text_encoder"] = get_peft_model_state_dict(te)
    save_peft_lora(out, states, cfgs, spec, {"loraloom.toyworld.steps": recipe.lora_steps})


def train_lora(paths: Paths, recipe: Recipe, spec: S.ConceptLoRA, progress: bool = True, position: int = 0) -> Path:
    """Train one concept LoRA on the saved base model and write `<assets>/loras/<id>.safetensors` (+ sidecar)."""
    recipe = recipe.for_lora(spec.id)
    work = paths.lora_work(spec.id)
    out = paths.loras / f"{spec.id}.safetensors"
    if is_done(work) and out.exists():
        return out
    unet, te, tok, vae = load_model_parts(paths.model)
    cfgs = lora_configs(recipe)
    index = [l.id for l in S.LORAS].index(spec.id)
    torch.manual_seed(SEEDS["lora"] + recipe.seed + index)
    params = add_lora_adapters(unet, te, cfgs)
    opt = torch.optim.AdamW(params, lr=recipe.lora_lr, weight_decay=1e-4)
    loop = TrainingLoop(f"toyworld lora {spec.id}", work, recipe.lora_steps, opt, params,
                        {"params": ParamList(params), "opt": opt}, recipe.lora_lr, warmup=20,
                        checkpoint_every=recipe.checkpoint_every, position=position)
    unet.train()
    te.train()
    seed = SEEDS["lora"] + recipe.seed + 1000 * (index + 1)
    step = partial(lora_step, unet=unet, te=te, tokenizer=tok, sched=train_scheduler(),
                   pools=lora_pools(vae, spec, recipe, seed), recipe=recipe, seed=seed)
    loop.run(step, progress)
    save_lora(out, unet, te, cfgs, spec, recipe)
    mark_done(work, {"steps": recipe.lora_steps})
    return out


KOHYA_TWIN = "character_1"


def write_kohya_twin(paths: Paths) -> Path:
    """The kohya (sd-scripts) spelling of one trained LoRA, `<assets>/loras/kohya/<KOHYA_TWIN>.safetensors`."""
    from .lora_io import save_kohya_twin

    peft = paths.loras / f"{KOHYA_TWIN}.safetensors"
    return save_kohya_twin(peft, paths.loras / "kohya" / peft.name)


# --- tiny CLIP -------------------------------------------------------------------------------------------
def clip_step(step: int, *, model, tokenizer, x_all: torch.Tensor, scenes_: list,
              recipe: Recipe) -> dict[str, torch.Tensor]:
    """Step k of the tiny CLIP: augmented pool images and captions of their scenes, CLIP's contrastive loss."""
    seed = SEEDS["clip"] + recipe.seed
    g, rng = step_generator(seed, step), step_rng(seed, step)
    idx, x = augmented_batch(x_all, recipe.clip_batch, g, strength=0.7)
    ids = tokenize(tokenizer, clip_captions([scenes_[i] for i in idx.tolist()], rng))
    return {"loss": model(input_ids=ids, pixel_values=x, return_loss=True).loss}


def stage_clip(paths: Paths, recipe: Recipe, progress: bool = True):
    from transformers import CLIPTokenizer

    from .clipmodel import build_clip, build_processor, load_clip, retrieval_accuracy, save_clip

    if is_done(paths.clip_work) and (paths.clip / "config.json").exists():
        return load_clip(paths.clip)
    tokenizer = CLIPTokenizer.from_pretrained(paths.tokenizer)
    processor = build_processor(tokenizer)
    scenes_, images = scene_pool(recipe.clip_pool, SEEDS["pool"] + recipe.seed + 1, paths.clip_work / "pool.npz",
                                progress=progress)
    model = build_clip(tokenizer, SEEDS["clip"] + recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.clip_lr, weight_decay=0.05)
    loop = TrainingLoop("toyworld clip", paths.clip_work, recipe.clip_steps, opt, list(model.parameters()),
                        {"model": model, "opt": opt}, recipe.clip_lr, warmup=50, final_lr=0.02,
                        checkpoint_every=recipe.checkpoint_every * 2, digits=3)
    model.train()
    loop.run(partial(clip_step, model=model, tokenizer=tokenizer, x_all=S.to_tensor_batch(images), scenes_=scenes_,
                     recipe=recipe), progress)
    model.eval()
    save_clip(model, processor, paths.clip)
    model, processor = load_clip(paths.clip)
    acc = {"text_to_image_top1_100": retrieval_accuracy(model, processor, 100),
           "trigger_text_to_image_top1_100": retrieval_accuracy(model, processor, 100, trigger_text=True), "chance": 0.01}
    mark_done(paths.clip_work, acc)
    return model, processor
