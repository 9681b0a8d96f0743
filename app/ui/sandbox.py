"""A small offline world for exercising the web UI (tests, timing scripts): the tiny SD 1.x model, the example
LoRAs copied into a fresh folder (with a preview image, a damaged file and a symlink that points outside), a
tiny random CLIP, and a context manager that serves the app on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from .config import ASSETS, UIConfig

EXAMPLE_LORAS = ASSETS / "examples" / "loras"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_ui_world(folder: str | Path, clip: bool = True, hazards: bool = True) -> UIConfig:
    """A UIConfig on `tiny:sd1` whose LoRA folder holds copies of the example LoRAs (with sidecars), a preview of
    one of them and, with `hazards`, a damaged LoRA and a symlink to a LoRA outside the folder."""
    from PIL import Image

    folder = Path(folder)
    loras = folder / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for f in EXAMPLE_LORAS.iterdir():
        if f.suffix in (".safetensors", ".json"):
            shutil.copyfile(f, loras / f.name)
    Image.new("RGB", (24, 24), (200, 40, 40)).save(loras / "tiny_character.png")
    if hazards:
        (loras / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
        outside = folder / "outside"
        outside.mkdir(exist_ok=True)
        shutil.copyfile(EXAMPLE_LORAS / "tiny_style.safetensors", outside / "elsewhere.safetensors")
        link = loras / "linked_out.safetensors"
        if not link.is_symlink():
            link.symlink_to(outside / "elsewhere.safetensors")
    clip_dir = None
    if clip:
        from loraloom.evaluation.fakes import tiny_clip_folder

        clip_dir = str(tiny_clip_folder(folder / "clip"))
    return UIConfig(models=["tiny:sd1"], lora_dirs=[loras], output_dir=folder / "out", clip=clip_dir,
                    prompt="a portrait, {triggers}", negative_prompt="blurry",
                    loras=[("tiny_character", 1.0), ("tiny_style", 0.8)], compare_methods=["merge", "switch", "composite"],
                    steps=2, height=32, width=32, name="tiny test world")


@contextlib.contextmanager
def serve(config: UIConfig, host: str = "127.0.0.1", service=None, **launch_kwargs) -> Iterator[tuple[object, str]]:
    """Build and launch the app in this process on a free port; yields (demo, url) and always closes it.
    `service`: an existing GenerationService (its model stays loaded) instead of a new one."""
    from .app import build_app, launch

    demo = build_app(config, service)
    _, url, _ = launch(demo, config, host=host, port=free_port(), prevent_thread_lock=True, quiet=True, **launch_kwargs)
    try:
        yield demo, url
    finally:
        demo.close()
