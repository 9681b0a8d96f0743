"""Shared fixtures: tiny offline pipelines and LoRA files synthesised in each layout."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import hashlib
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
torch.set_num_threads(1)  # one intra-op thread: on a shared 2-core machine a second one spin-waits (10x slower under load)


def _single_threaded():
    """One intra-op torch thread: the tiny models gain nothing from a second one, and on a shared 2-core machine
    two threads spin-wait each other (see benchmarks/bench_clipscore.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


one_thread = pytest.fixture(_single_threaded, name="one_thread")
one_thread_module = pytest.fixture(_single_threaded, scope="module", name="one_thread_module")  # for module-scoped servers


@pytest.fixture(autouse=True)
def fuse_every_layer(request, monkeypatch):
    """Merge's `fuse: true` fuses every adapted layer in tests (unless marked `fuse_cost`): on the tiny FLUX/SD3 models
    a run is too short for fusing to pay anywhere (`composition.fuse_cost`), and the tests of fused weights (against
    diffusers' fused LoRAs, keep_fused, bit-exact restores) are about the fused path."""
    if request.node.get_closest_marker("fuse_cost") is None:
        monkeypatch.setattr("loraloom.composition.routing.fusing_pays", lambda *args, **kwargs: True)


@pytest.fixture
def library_bars_restored(monkeypatch):
    """For tests of `quiet_library_bars`: afterwards the libraries' bars are on again, and
    HF_HUB_DISABLE_PROGRESS_BARS and torch's thread count are as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "")  # so that teardown restores it as it was (delenv alone
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")      # would not remove a value the test sets)
    threads = torch.get_num_threads()
    yield
    diffusers_logging.enable_progress_bar()
    transformers_logging.enable_progress_bar()
    torch.set_num_threads(threads)


def weights_hash(module: torch.nn.Module) -> str:
    """Bit-level fingerprint of every parameter and buffer."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def tiny_sd():
    from loraloom.pipelines import ComposedPipeline

    return ComposedPipeline.from_pretrained("tiny:sd1")


@pytest.fixture
def tiny_sdxl():
    from loraloom.pipelines import ComposedPipeline

    return ComposedPipeline.from_pretrained("tiny:sdxl")


@pytest.fixture
def lora_files(tmp_path, tiny_sd):
    """Three random PEFT-layout LoRAs (UNet + text encoder) for the tiny SD model, with sidecars."""
    from loraloom.pipelines.tiny import write_random_lora

    specs = [("char", "character", ("ohwx",)), ("style", "style", ("inkwash",)), ("bg", "background", ("forest",))]
    paths = {}
    for i, (name, cat, trig) in enumerate(specs):
        paths[name] = write_random_lora(tiny_sd.pipe, tmp_path / f"{name}.safetensors", seed=i + 1, alpha=2.0 + i,
                                        triggers=trig, category=cat, std=0.15)
    return paths


def pytest_collection_modifyitems(config, items):
    """Marker `gpu` means it: without CUDA such a test is skipped, with the reason (`-ra` prints it); with CUDA it runs."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"gpu: needs a CUDA device; torch.cuda.is_available() is False here (torch "
                                   f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
