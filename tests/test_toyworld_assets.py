"""The shipped toy world (assets/toyworld/): it loads offline, its LoRAs load and act, the kohya twin equals its
PEFT original, the manifest is complete, the checker and the tiny CLIP work on fresh scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from loraloom.evaluation.toyworld import ASSETS, CHECKER, CLIP, LORAS_DIR, MANIFEST, MODEL
from loraloom.evaluation.toyworld import scenes as S

pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="toy-world assets not trained")

STEPS = 25


@pytest.fixture(scope="module")
def cp():
    from loraloom.pipelines import ComposedPipeline

    pipe = ComposedPipeline.from_pretrained(str(MODEL))
    for spec in S.LORAS:
        pipe.load_lora(LORAS_DIR / f"{spec.id}.safetensors", name=spec.id)
    return pipe


@pytest.fixture(scope="module")
def checker():
    from loraloom.evaluation.toyworld.checker import Checker

    return Checker.load(CHECKER)


def generate(cp, prompt, seeds, loras=()):
    from loraloom.evaluation.toyworld.manifest import sampler_defaults

    cfg = sampler_defaults(ASSETS)["guidance_scale"]  # the world's own CFG, as its users get it
    return np.stack([np.asarray(cp(prompt, loras=[(l, 1.0) for l in loras], num_inference_steps=STEPS, guidance_scale=cfg,
                                   seed=s, scheduler="default", progress_bar=False).images[0]) for s in seeds])


def test_size_budget_and_fp16():
    from safetensors import safe_open

    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"assets/toyworld is {total / 2**20:.1f} MB"
    for path in list(MODEL.rglob("*.safetensors")) + list(LORAS_DIR.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(".alpha")}
        assert dtypes == {"F16"}, (path, dtypes)


def test_plain_diffusers_loads_it_offline_and_generates_32px():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle, white background", num_inference_steps=10, guidance_scale=4.0, height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)
    arr = np.asarray(img).astype(float)
    assert arr.std() > 20  # an image, not a flat colour
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.timestep_spacing == "trailing"


def test_shipped_scheduler_is_the_recipes_sampler():
    """The saved scheduler config is the recipe's DDIM (`models.SCHEDULER_CONFIG`), key for key."""
    from loraloom.evaluation.toyworld.models import SCHEDULER_CONFIG

    saved = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMScheduler"
    assert {k: saved[k] for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG


def test_base_model_draws_what_it_is_asked(cp, checker):
    prompts = [("a red circle, white background", ("circle", "red", "white")),
               ("a blue square, black background", ("square", "blue", "black")),
               ("a yellow triangle, white background", ("triangle", "yellow", "white"))]
    hits = 0
    for prompt, want in prompts:
        for pred in checker.predict(generate(cp, prompt, [0, 1])):
            hits += (pred["shape"], pred["colour"], pred["background"]) == want
    assert hits >= 5, hits


@pytest.mark.slow
def test_every_lora_loads_with_its_metadata_and_changes_the_image(cp):
    from loraloom.composition import load_lora

    base = generate(cp, "a red circle, white background", [3])[0].astype(float)
    for spec in S.LORAS:
        path = LORAS_DIR / f"{spec.id}.safetensors"
        lora = load_lora(path)
        assert lora.layout == "diffusers-peft" if hasattr(lora, "layout") else lora.info.layout == "diffusers-peft"
        assert lora.info.family == "sd1" and lora.info.family_source == "modelspec.architecture"
        assert lora.category == spec.category and lora.triggers == [spec.trigger]
        assert all(l.alpha == float(json.loads(lora.info.metadata["lora_adapter_metadata"])["unet.lora_alpha"])
                   for l in lora.layers["unet"].values())
        resident = cp.loras[spec.id].layers
        assert len(resident["unet"]) > 0 and len(resident["text_encoder"]) > 0
        assert lora.info.num_modules == len(resident["unet"]) + len(resident["text_encoder"])
        side = json.loads(path.with_suffix(".json").read_text())
        assert side["category"] == spec.category and side["triggers"] == [spec.trigger] and side["name"]
        scene = S.Scene("circle", "red", "white").with_(**({spec.attribute: spec.value}))
        with_lora = generate(cp, S.caption(scene), [3], [spec.id])[0].astype(float)
        assert np.abs(with_lora - base).mean() > 2.0, spec.id


@pytest.mark.parametrize("lora_id", ["style_1", "character_1"])  # attention-only; with conv (LoCon-style) targets
def test_diffusers_itself_loads_every_key_of_a_shipped_lora(lora_id):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True, dtype=torch.float32)
    path = LORAS_DIR / f"{lora_id}.safetensors"
    pipe.load_lora_weights(str(path), adapter_name="s1")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k).float() for k in keys}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        n_keys = len([k for k in keys if k.startswith(component + ".")])
        assert n_keys > 0, component  # the shipped LoRAs have a text-encoder part (it binds the trigger word)
        loaded = {n: p for n, p in model.named_parameters() if "lora_" in n and ".s1." in n}
        assert len(loaded) == n_keys, component
        name, param = next((n, p) for n, p in loaded.items() if "lora_B" in n)
        assert torch.equal(param.detach().float(), tensors[f"{component}.{name.replace('.s1.', '.')}"])


def test_kohya_twin_generates_the_same_image_as_its_peft_original(cp):
    from loraloom.composition import load_lora
    from loraloom.evaluation.toyworld.trainers import KOHYA_TWIN

    twin = LORAS_DIR / "kohya" / f"{KOHYA_TWIN}.safetensors"
    lora = load_lora(twin)
    assert lora.info.layout == "kohya"
    peft = cp.loras[KOHYA_TWIN]
    assert set(lora.layers["unet"]) == set(peft.layers["unet"])
    # named as sd-scripts writes them (transformers 4's `text_model` level), which this model's encoder lacks
    assert all(m.startswith("text_model.") for m in lora.layers["text_encoder"])
    assert {m.removeprefix("text_model.") for m in lora.layers["text_encoder"]} == set(peft.layers["text_encoder"]) != set()
    assert any(name.endswith(".conv1") for name in lora.layers["unet"])  # the kohya loader's LoCon path, on a trained file
    if "twin" not in cp.loras:
        cp.load_lora(twin, name="twin")
    assert set(cp.loras["twin"].layers["text_encoder"]) == set(peft.layers["text_encoder"])  # every layer resident
    prompt = "a red stellu, white background"
    a = generate(cp, prompt, [5], [KOHYA_TWIN])
    b = generate(cp, prompt, [5], ["twin"])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, generate(cp, prompt, [5]))


def test_manifest_counts_and_order():
    data = yaml.safe_load(MANIFEST.read_text())
    assert data["format"] == "loraloom-benchmark/1"
    assert (ASSETS / data["base_models"]["toyworld"]["model"] / "model_index.json").exists()
    ids = [l["id"] for l in data["loras"]]
    assert ids == [l.id for l in S.LORAS]
    for l in data["loras"]:
        assert (ASSETS / l["file"]).exists()
    cats = [l["category"] for l in data["loras"]]
    assert {c: cats.count(c) for c in set(cats)} == {"character": 3, "clothing": 2, "style": 2, "background": 2, "object": 2}
    sizes = [len(s["loras"]) for s in data["sets"]]
    assert {n: sizes.count(n) for n in set(sizes)} == {2: 24, 3: 72, 4: 96, 5: 48}
    assert sizes == sorted(sizes)
    by_id = {l["id"]: l for l in data["loras"]}
    for s in data["sets"]:
        assert by_id[s["loras"][0]]["category"] == "character"
        trig = [by_id[i]["triggers"][0] for i in s["loras"]]
        assert s["scoring_text"] == ", ".join(trig) and s["prompt"].endswith(s["scoring_text"])
    d = data["defaults"]
    assert (d["height"], d["width"], d["scheduler"]) == (32, 32, "default")


def test_shipped_sampler_defaults_are_the_recipes_and_the_check_uses_them():
    """benchmark.yaml, the example spec and the check all sample at the recipe's settings (a CFG changed in the
    recipe but not re-written into the manifest, or a check that hard-codes its own, fails here)."""
    from loraloom.evaluation.toyworld.manifest import sampler_defaults
    from loraloom.evaluation.toyworld.quality import ComposedGenerator
    from loraloom.evaluation.toyworld.recipe import Recipe

    r = Recipe()
    want = {"steps": r.sample_steps, "guidance_scale": r.guidance_scale}
    assert sampler_defaults(ASSETS) == want
    example = yaml.safe_load((ASSETS.parent / "examples" / "toyworld.yaml").read_text())
    assert (example["steps"], example["guidance_scale"]) == (want["steps"], want["guidance_scale"])
    gen = ComposedGenerator(ASSETS)
    assert (gen.steps, gen.guidance_scale) == (want["steps"], want["guidance_scale"])
    assert ComposedGenerator(ASSETS, guidance_scale=7.0).guidance_scale == 7.0


def test_checker_reads_fresh_generator_images(checker):
    from loraloom.evaluation.toyworld.trainers import checker_accuracy

    acc = checker_accuracy(checker, n=400, seed=777)
    assert min(acc.values()) >= 0.97, acc


def test_tiny_clip_retrieval_beats_chance():
    from transformers import CLIPModel, CLIPProcessor

    from loraloom.evaluation.toyworld.clipmodel import retrieval_accuracy

    model = CLIPModel.from_pretrained(CLIP).eval()
    processor = CLIPProcessor.from_pretrained(CLIP)
    acc = retrieval_accuracy(model, processor, n=50, seed=99)
    assert acc >= 0.2, acc  # chance is 0.02


@pytest.mark.parametrize("progress", [True, False])
def test_check_worker_without_progress_prints_no_library_bars(progress, library_bars_restored, capfd):
    """`toyworld check --no-progress` printed diffusers' and transformers' loading bars from every worker."""
    import os

    from loraloom.evaluation.toyworld.quality import Probe, _generate_chunk

    images = _generate_chunk(str(ASSETS), [Probe("a red circle", 0)], 2, None, 0, progress)
    assert images.shape == (1, S.SIZE, S.SIZE, 3)
    err = capfd.readouterr().err
    assert ("Loading pipeline components" in err) == progress
    assert (os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1") == (not progress)  # what spawned workers inherit


def test_check_without_progress_quiets_the_libraries_before_loading(monkeypatch):
    from loraloom.evaluation.toyworld import training
    from loraloom.evaluation.toyworld.checker import Checker
    from loraloom.evaluation.toyworld.quality import run_check

    class Quieted(Exception):
        pass

    class Loading(Exception):
        pass

    def quiet():
        raise Quieted

    def load(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(training, "quiet_library_bars", quiet)
    monkeypatch.setattr(Checker, "load", load)
    with pytest.raises(Quieted):
        run_check(ASSETS, progress=False, printer=lambda *a: None)
    with pytest.raises(Loading):  # with progress bars the libraries keep theirs
        run_check(ASSETS, progress=True, printer=lambda *a: None)
