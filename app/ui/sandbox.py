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
    one of them and, with `hazards`, a damaged LoRA and a symlink to a LoRA outside the folder. Files are written
    through a write policy rooted at `folder`; files already there are kept (calling it twice is harmless)."""
    from PIL import Image

    from loraloom.composition.files import WritePolicy, write_file

    folder = Path(folder)
    policy = WritePolicy.at(folder)

    def put(path: Path, write) -> None:
        if not (path.exists() or path.is_symlink()):
            write_file(path, write, policy, what="sandbox file", replace=False)

    loras = folder / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for f in EXAMPLE_LORAS.iterdir():
        if f.suffix in (".safetensors", ".json"):
            put(loras / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))
    put(loras / "tiny_character.png", lambda tmp: Image.new("RGB", (24, 24), (200, 40, 40)).save(tmp, format="PNG"))
    if hazards:
        put(loras / "broken.safetensors", lambda tmp: tmp.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"))
        outside = folder / "outside"
        put(outside / "elsewhere.safetensors", lambda tmp: shutil.copyfile(EXAMPLE_LORAS / "tiny_style.safetensors", tmp))
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
def serve(config: UIConfig, host: str = "127.0.0.1", service=None, port: int | None = None,
          **launch_kwargs) -> Iterator[tuple[object, str]]:
    """Build and launch the app in this process (on `port`, else a free one); yields (demo, url) and always closes
    it. `service`: an existing GenerationService (its model stays loaded) instead of a new one."""
    from .app import build_app, launch

    demo = build_app(config, service)
    _, url, _ = launch(demo, config, host=host, port=port or free_port(), prevent_thread_lock=True, quiet=True,
                       **launch_kwargs)
    try:
        yield demo, url
    finally:
        demo.close()
