"""FLUX.1 and SD3 through the entry points that sit above the pipeline (issue 28): the web UI service's image
geometry, `bench run` with reference seeding, the sampler defaults a spec / the CLI / the UI leave to the family,
the memory-offload flags, and every method either running or refusing with its reason. Tiny pipelines saved to a
local folder, one torch thread."""

from __future__ import annotations

import re

import pytest
import torch
from dit_references import SD3_TARGETS, write_peft_lora

from loraloom.evaluation.bench.tiny_bench import TINY_LORAS, torch_threads, write_tiny_benchmark
from loraloom.pipelines.tiny_dit import build_tiny_flux, build_tiny_sd3

BUILD = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
TARGETS = {"flux": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_out"), "sd3": SD3_TARGETS}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny DiT pipeline saved as a diffusers folder, with the tiny benchmark's LoRAs written for it."""
    root = tmp_path_factory.mktemp("dit")
    out = {}
    for family, build in BUILD.items():
        pipe = build(0)
        pipe.save_pretrained(root / family / "model")
        loras = root / family / "loras"
        loras.mkdir()
        for i, (name, _, _) in enumerate(TINY_LORAS):
            write_peft_lora(pipe, loras, name, seed=i + 1, targets=TARGETS[family], text_encoder=False)
        out[family] = root / family
    return out


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_ui_geometry_from_configs_and_loaded(folders, family, tmp_path):
    """The UI reads a FLUX/SD3 folder's size and size multiple from its transformer and VAE configs (it read
    unet/config.json before and then the loaded UNet's blocks, which these models lack); loaded, the same numbers."""
    from loraloom.app.ui.config import UIConfig
    from loraloom.app.ui.service import GenerationService

    folder = str((folders[family] / "model").resolve())
    service = GenerationService(UIConfig(models=[folder], lora_dirs=[folders[family] / "loras"], output_dir=tmp_path / "out"))
    side, multiple = service.geometry(folder, load=False)
    assert service.cache.pipeline is None  # nothing loaded
    assert service.geometry(folder) == (side, multiple)  # loaded: the family's own numbers
    cp = service.cache.pipeline
    assert (side, multiple) == (cp.default_size, cp.size_multiple)
    # tiny: a 2x VAE; FLUX: FluxPipeline's 128 latent cells, 2x2 packing; SD3: the transformer's sample size, patch 1
    assert (side, multiple) == {"flux": (256, 4), "sd3": (32, 2)}[family]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bench_run_reference_seeding_on_dit(folders, family, tmp_path):
    """`bench run --reference-seeding` on FLUX/SD3: each item's generator is fast-forwarded over the family's own
    latent shape (FLUX: 16 channels before packing, SD3: the transformer's in_channels), so the images equal the
    reference loop's, one generator seeded once and drawn in set order."""
    from PIL import Image

    from loraloom.evaluation.bench.manifest import load_manifest
    from loraloom.evaluation.bench.plan import build_plan, parse_methods
    from loraloom.evaluation.bench.runner import RunOptions, run_benchmark
    from loraloom.pipelines.batch import PipelineCache

    manifest = write_tiny_benchmark(folders[family], size=16, extra={
        "base_models": {"tiny": {"model": str(folders[family] / "model")}}})
    m = load_manifest(manifest)
    sets = [s for s in m.sets if s.n == 3][::-1]  # made out of order
    cache = PipelineCache()
    opts = RunOptions(manifest=m, out=tmp_path / "out", variants=parse_methods("merge"), sets=sets, progress=False,
                      device="cpu", cache=cache, seeds=1, reference_seeding=True)
    s = run_benchmark(opts)
    assert (s.generated, s.failed) == (2, 0)
    cp = cache.pipeline
    assert cp.family == family
    g = torch.Generator("cpu").manual_seed(0)
    plan = build_plan(m, [x for x in m.sets if x.n == 3], opts.variants, seeds=1, reference_seeding=True)
    for it in plan:  # the reference loop, in run order
        spec = it.spec
        ref = cp(spec.prompt, negative_prompt=spec.negative_prompt, loras=[(r.name, r.weight) for r in spec.loras],
                 method="merge", method_params=spec.method_params, num_inference_steps=spec.steps,
                 guidance_scale=spec.guidance_scale, height=spec.height, width=spec.width, generator=g,
                 scheduler=spec.scheduler, progress_bar=False).images[0]
        ours = Image.open(opts.out / it.png).convert("RGB")
        assert list(ours.getdata()) == list(ref.getdata())


def _tiny_sd35(seed: int = 0):
    """The tiny SD3 pipeline with SD 3.5's QK-norm (what tells 3.5 from 3 in a transformer config)."""
    from diffusers import SD3Transformer2DModel

    pipe = build_tiny_sd3(seed)
    torch.manual_seed(seed)
    pipe.transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                             num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                             pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm").eval()
    return pipe


@pytest.mark.parametrize("variant, expected", [
    ("tiny:flux", (28, 3.5, "default")),  # FLUX.1-dev
    ("schnell", (4, 0.0, "default")),  # no guidance embedding
    ("tiny:sd3", (28, 7.0, "default")),  # SD 3 Medium
    ("sd35", (28, 3.5, "default")),  # SD 3.5 (QK-norm)
    ("tiny:sd1", (30, 7.5, "dpmsolver++")),  # unchanged
])
def test_spec_without_sampler_settings_uses_the_familys_and_records_them(variant, expected, tmp_path, capsys):
    """A spec file (and so the CLI) that leaves steps, guidance and scheduler out runs with the family's values and
    the PNG's spec records them; the file name is the one the same spec always had (unset hashes as DEFAULTS)."""
    import yaml

    from loraloom.app.cli import main
    from loraloom.pipelines.spec import GenerationSpec, read_png_spec

    model = variant
    if not variant.startswith("tiny:"):
        pipe = build_tiny_flux(0, guidance_embeds=False) if variant == "schnell" else _tiny_sd35(0)
        pipe.save_pretrained(tmp_path / variant)
        model = str(tmp_path / variant)
    spec = {"model": model, "prompts": ["a red cat"], "methods": ["merge"], "height": 16, "width": 16, "seeds": [0]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["generate", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out")]) == 0
    png = next((tmp_path / "out").glob("merge_*.png"))
    recorded = read_png_spec(png)
    assert (recorded.steps, recorded.guidance_scale, recorded.scheduler) == expected
    unset = GenerationSpec(model=model, prompt="a red cat", height=16, width=16)
    explicit = GenerationSpec(model=model, prompt="a red cat", height=16, width=16, steps=30, guidance_scale=7.5,
                              scheduler="dpmsolver++")
    assert png.name == unset.file_name() == explicit.file_name()  # SD names are what they were
    capsys.readouterr()
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "again")]) == 0  # remade from the values used
    assert "identical to the source" in capsys.readouterr().out


def test_ui_form_without_steps_and_cfg_uses_the_familys(folders, tmp_path):
    """The web UI's form left empty (its default now) generates with the family's steps and CFG; progress counts them."""
    from loraloom.app.ui.config import UIConfig
    from loraloom.app.ui.service import GenerationService

    folder = str((folders["flux"] / "model").resolve())
    config = UIConfig(models=[folder], lora_dirs=[folders["flux"] / "loras"], output_dir=tmp_path / "out")
    assert (config.steps, config.guidance_scale) == (None, None)
    service = GenerationService(config)
    spec = service.make_spec(folder, "a red cat", "", [["char_a", 1.0]], "merge", {}, "", None, 16, 16, "default", 0)
    assert (spec.steps, spec.guidance_scale) == (None, None)
    result = service.generate(spec)
    assert (result.spec.steps, result.spec.guidance_scale, result.spec.scheduler) == (28, 3.5, "default")
    assert service.progress == (28, 28)


def test_transformer_lora_reader_uses_only_public_helpers():
    """composition/transformer_loras.py builds on the SD reader's helpers by their public names (they were private)."""
    import ast
    from pathlib import Path

    import loraloom.composition.transformer_loras as module
    from loraloom.composition import lora, lora_formats

    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and
                node.module.lstrip(".") in ("lora", "lora_formats") for a in node.names]
    assert {"build_adapters", "describe_lora", "tensor_element_size", "alphas_from_adapter_metadata"} <= set(imported)
    assert not [n for n in imported if n.startswith("_")]
    assert {"build_adapters", "describe_lora", "tensor_element_size"} <= set(lora.__all__)
    assert callable(lora_formats.alphas_from_adapter_metadata)


@pytest.mark.parametrize("argv", [
    ["generate", "{spec}", "--cpu-offload"],
    ["generate", "{spec}", "--sequential-offload"],
    ["ui", "--cpu-offload", "--port", "0"],
    ["bench", "run", "{bench}", "--out", "{out}", "--sequential-offload"],
])
def test_offload_flags_without_an_accelerator_are_one_error_line(argv, tmp_path, capsys, monkeypatch):
    """No accelerator (this machine): each offload flag is one 'loraloom: error:' line naming the flag and the fix,
    exit 2, nothing loaded or written."""
    import yaml

    from loraloom.app.cli import main
    from loraloom.pipelines import composed

    monkeypatch.setattr(composed, "accelerator_device", lambda: None)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"model": "tiny:flux", "prompts": ["a cat"], "out": str(tmp_path / "out")}))
    bench = write_tiny_benchmark(tmp_path / "bench")
    args = [a.format(spec=tmp_path / "spec.yaml", bench=bench, out=tmp_path / "out") for a in argv]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    flag = next(a for a in argv if a.endswith("offload"))
    assert len(err) == 1 and err[0].startswith(f"loraloom: error: {flag}") and "no accelerator" in err[0] and "Fix:" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode, call", [("model", "enable_model_cpu_offload"), ("sequential", "enable_sequential_cpu_offload")])
def test_offload_calls_diffusers_when_an_accelerator_is_reported(mode, call, monkeypatch):
    """With an accelerator reported, the pipeline is loaded on the CPU and diffusers' own offload method is called with
    that device; LoRA factors are placed on it; --device cuda with offload is refused."""
    from diffusers import FluxPipeline

    from loraloom.composition.errors import GenerationError
    from loraloom.pipelines import composed
    from loraloom.pipelines.batch import PipelineCache
    from loraloom.pipelines.spec import GenerationSpec

    calls = []
    monkeypatch.setattr(composed, "accelerator_device", lambda: "cuda")
    for name in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        monkeypatch.setattr(FluxPipeline, name, lambda self, *a, _n=name, **kw: calls.append((_n, a, kw)))
    cache = PipelineCache(device="cpu", offload=mode)
    cp = cache.get(GenerationSpec(model="tiny:flux", prompt="a cat"))
    assert calls == [(call, (), {"device": "cuda"})]
    assert cp.offload == mode and cp.device == torch.device("cuda") and cp.denoiser.device.type == "cpu"
    assert {str(r.execution_device) for r in cp.routers.values()} == {"cuda"}
    with pytest.raises(GenerationError, match="--device cuda would load them onto the accelerator first"):
        composed.check_offload(mode, "cuda")


# the words naming each LoRA in "a cat", for the methods that need them (these LoRAs have no trigger words)
WORDS = {"clora": {"concepts": ["cat", "a"]}, "tokenroute": {"concepts": {"char_a": "cat"}, "roles": {"ink": "global"}}}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_method_runs_or_refuses_with_its_reason(family, folders, tmp_path):
    """The README's methods x families table: on FLUX.1 and SD3 each method either generates or is refused with a
    GenerationError naming the reason (METHOD_LIMITS) before any step, never another exception."""
    from loraloom.composition.errors import GenerationError
    from loraloom.composition.methods import available_methods
    from loraloom.pipelines import ComposedPipeline
    from loraloom.pipelines.families.base import DIT_METHODS, METHOD_LIMITS

    cp = ComposedPipeline(BUILD[family](0))
    for name in ("char_a", "ink"):
        cp.load_lora(folders[family] / "loras" / f"{name}.safetensors")
    builtin = ("merge", "switch", "composite", "klora", "ziplora", "hypernet", "clora", "cmlora", "loratorio", "tokenroute")
    assert set(builtin) <= set(available_methods())
    for method in builtin:
        kw = dict(loras=["char_a", "ink"], method=method, num_inference_steps=2, height=16, width=16, output_type="latent",
                  progress_bar=False, output_dir=tmp_path, method_params=WORDS.get(method, {}))
        if method in DIT_METHODS:
            assert torch.isfinite(cp("a cat", **kw).latents).all()
        else:
            with pytest.raises(GenerationError, match=f"'{method}' does not run on .*{re.escape(METHOD_LIMITS['transformer'][method][:30])}"):
                cp("a cat", **kw)


def test_ui_scheduler_box_fits_the_model(folders, tmp_path):
    """Choosing a FLUX model in the UI sets the Scheduler box to 'default' (its own flow-matching scheduler: an SD
    scheduler name would be refused at Generate); an SD model keeps what the box says."""
    from loraloom.app.ui.config import UIConfig
    from loraloom.app.ui.service import GenerationService

    folder = str((folders["flux"] / "model").resolve())
    service = GenerationService(UIConfig(models=[folder, "tiny:sd1"], lora_dirs=[folders["flux"] / "loras"],
                                         output_dir=tmp_path / "out"))
    assert service.scheduler_for(folder, "dpmsolver++") == "default"
    assert service.scheduler_for(folder, "FlowMatchEulerDiscreteScheduler") == "FlowMatchEulerDiscreteScheduler"
    assert service.scheduler_for("tiny:sd1", "dpmsolver++") == "dpmsolver++"
