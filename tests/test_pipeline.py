"""Composed pipelines on SD 1.x and SDXL: loading, schedulers, callbacks, argument checks."""

from __future__ import annotations

import pytest
import torch

from loraloom.pipelines import ComposedPipeline, ModelLoadError, make_scheduler, scheduler_names
from loraloom.pipelines.tiny import build_tiny_sd


def test_sdxl_all_methods(tiny_sdxl, tmp_path):
    from loraloom.pipelines.tiny import write_random_lora

    for i in range(2):
        tiny_sdxl.load_lora(write_random_lora(tiny_sdxl.pipe, tmp_path / f"x{i}.safetensors", seed=i), f"x{i}")
    assert set(tiny_sdxl.routers) == {"unet", "text_encoder", "text_encoder_2"}
    for method in ("merge", "switch", "composite"):
        out = tiny_sdxl("a cat", loras=["x0", "x1"], method=method, num_inference_steps=2, seed=0, progress_bar=False)
        assert out.images[0].size == (64, 64)


def test_from_saved_folder_offline_equals_in_memory(tmp_path):
    pipe = build_tiny_sd()
    pipe.save_pretrained(tmp_path / "model")
    kw = dict(num_inference_steps=2, seed=3, scheduler="default", output_type="latent", progress_bar=False)
    a = ComposedPipeline(build_tiny_sd())("x", **kw).latents
    loaded = ComposedPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    b = loaded("x", **kw).latents
    torch.testing.assert_close(a, b)


def test_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        ComposedPipeline.from_pretrained("./does/not/exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        ComposedPipeline.from_pretrained(str(tmp_path / "empty"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="safetensors"):
        ComposedPipeline.from_pretrained(str(ckpt))


@pytest.mark.parametrize("name", ["dpmsolver++", "ddim", "euler", "euler-a", "heun", "unipc", "default", "LMSDiscreteScheduler"])
def test_schedulers_by_name(tiny_sd, name):
    out = tiny_sd("x", num_inference_steps=3, scheduler=name, seed=0, output_type="latent", progress_bar=False)
    assert torch.isfinite(out.latents).all()
    if name == "heun":  # second-order: two model evaluations per step, each a loop step for the method
        assert out.unet_calls == 5


def test_default_scheduler_is_dpmsolver_plus_plus(tiny_sd):
    s = make_scheduler(None, tiny_sd.pipe.scheduler.config)
    assert type(s).__name__ == "DPMSolverMultistepScheduler" and s.config.algorithm_type == "dpmsolver++"
    assert "dpmsolver++" in scheduler_names()
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("warp-drive", tiny_sd.pipe.scheduler.config)


def test_callback_sees_every_step_and_can_replace_latents(tiny_sd):
    steps = []

    def cb(pipe, i, t, kwargs):
        steps.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else None

    out = tiny_sd("x", num_inference_steps=3, scheduler="ddim", callback_on_step_end=cb, output_type="latent", progress_bar=False)
    assert steps == [0, 1, 2] and torch.count_nonzero(out.latents) == 0


def test_interrupt_stops_after_current_step(tiny_sd):
    seen = []

    def cb(pipe, i, t, kwargs):
        seen.append(i)
        pipe.interrupt()

    out = tiny_sd("x", num_inference_steps=5, callback_on_step_end=cb, output_type="latent", progress_bar=False)
    assert seen == [0] and out.interrupted
    assert not tiny_sd("x", num_inference_steps=2, output_type="latent", progress_bar=False).interrupted


@pytest.mark.parametrize("kw,msg", [
    ({"height": 62}, "multiple of 4"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"loras": ["missing"]}, "no LoRA named"),
])
def test_bad_arguments(tiny_sd, kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_sd("x", **{"num_inference_steps": 2, "progress_bar": False, **kw})


def test_seed_and_generator_agree(tiny_sd):
    a = tiny_sd("x", num_inference_steps=2, seed=11, output_type="latent", progress_bar=False).latents
    b = tiny_sd("x", num_inference_steps=2, generator=torch.Generator().manual_seed(11), output_type="latent", progress_bar=False).latents
    torch.testing.assert_close(a, b)


def test_progress_bar_shows_method(tiny_sd, capsys):
    tiny_sd("x", num_inference_steps=2, method="merge", output_type="latent", progress_bar=True)
    assert "merge" in capsys.readouterr().err
