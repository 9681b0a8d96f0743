"""FLUX.1 and SD3 through the entry points that sit above the pipeline (issue 28): the web UI service's image
geometry, `bench run` with reference seeding, the sampler defaults a spec / the CLI / the UI leave to the family,
the memory-offload flags, and every method either running or refusing with its reason. Tiny pipelines saved to a
local folder, one torch thread."""

from __future__ import annotations

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
