"""The hostile-input corpus: bad LoRA files, hostile PNGs and bad spec files, built in a folder by the tests.

Each input is (name, path or data, what the error must mention). The suite (tests/test_hostile_inputs.py) runs
every input through each entry point (the CLI in-process, the Python API, the web UI's API) and checks: a clear
error that names the problem, no traceback, nothing written outside the output folder, the base weights
unchanged, and the next ordinary request still served.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from loraloom.pipelines.tiny import build_tiny_sdxl, random_lora_state_dict


@dataclass(frozen=True)
class Hostile:
    name: str
    path: Path
    expect: str  # a regex the error message must match


def lora_corpus(folder: Path, good: Path) -> list[Hostile]:
    """Bad LoRA files next to one good one (`good`, a PEFT LoRA for the tiny SD 1.x model)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    tensors = load_file(str(good))
    out = []

    def put(name: str, expect: str, write) -> None:
        path = folder / name
        write(path)
        out.append(Hostile(name, path, expect))

    put("truncated.safetensors", "truncated or corrupted", lambda p: p.write_bytes(data[: len(data) // 3]))
    put("garbage.safetensors", "truncated or corrupted", lambda p: p.write_bytes(os.urandom(4096)))
    put("empty.safetensors", "truncated or corrupted|empty", lambda p: p.write_bytes(b""))
    put("huge_header.safetensors", "truncated or corrupted", lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"))
    first = next(iter(tensors))
    put("nan.safetensors", "NaN/Inf", lambda p: save_file({**tensors, first: tensors[first].clone().fill_(float("nan"))}, str(p)))
    put("inf.safetensors", "NaN/Inf", lambda p: save_file({**tensors, first: tensors[first].clone().fill_(float("inf"))}, str(p)))
    put("not_a_lora.safetensors", "does not contain LoRA weights", lambda p: save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(p)))
    put("loha.safetensors", "LoHa", lambda p: save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(p)))
    put("unknown_keys.safetensors", "understand", lambda p: save_file({"unet.x.lora_A.weight": torch.zeros(2, 2), "unet.x.weird": torch.zeros(1)}, str(p)))
    put("pickle.ckpt", "pickled checkpoint|pickles can run code", lambda p: torch.save(tensors, p))
    put("fifo.safetensors", "not a regular file", lambda p: os.mkfifo(p))
    put("folder.safetensors", "is a folder", lambda p: p.mkdir())
    xl = build_tiny_sdxl()
    put("sdxl.safetensors", "Stable Diffusion XL", lambda p: save_file(
        {**{f"unet.{k}": v for k, v in random_lora_state_dict(xl.unet, 4).items()},
         **{f"text_encoder_2.{k}": v for k, v in random_lora_state_dict(xl.text_encoder_2, 4, targets=("q_proj",)).items()}}, str(p)))
    return out


def spec_corpus(folder: Path, lora: Path, lora_folder: Path) -> list[Hostile]:
    """Bad spec files for `loraloom generate` (the model is tiny:sd1; `lora` a good LoRA file)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {"model": "tiny:sd1", "loras": [{"path": str(lora)}], "prompts": ["a star"], "methods": ["merge"], "steps": 2,
            "height": 32, "width": 32, "out": str(folder / "out")}
    out = []

    def put(name: str, expect: str, content) -> None:
        path = folder / name
        if isinstance(content, dict):
            path.write_text(yaml.safe_dump(content))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif callable(content):
            content(path)
        else:
            path.write_text(content)
        out.append(Hostile(name, path, expect))

    put("steps_zero.yaml", "steps must be between 1 and", {**base, "steps": 0})
    put("steps_text.yaml", "steps must be a whole number", {**base, "steps": "many"})
    put("unknown_method.yaml", "unknown method", {**base, "methods": ["teleport"]})
    put("weight_text.yaml", "weight must be a number", {**base, "loras": [{"path": str(lora), "weight": "heavy"}]})
    put("huge_height.yaml", "height must be between", {**base, "height": 100000})
    put("too_many_pixels.yaml", "more than the limit", {**base, "height": 8192, "width": 8192})
    put("odd_size.yaml", "multiple of 8", {**base, "height": 100})
    put("flow_scheduler.yaml", "does not sample Stable Diffusion", {**base, "scheduler": "FlowMatchEulerDiscreteScheduler"})
    put("bad_params.yaml", "must map a method name", {**base, "methods": ["composite"], "method_params": {"composite": 5}})
    put("unknown_param.yaml", "no parameter", {**base, "methods": ["composite"], "method_params": {"composite": {"max_btch": 1}}})
    put("write_outside.yaml", "outside the output folder", {**base, "methods": ["ziplora"],
        "method_params": {"ziplora": {"save_merged": str(folder.parent / "elsewhere" / "x.safetensors")}}})
    put("write_into_loras.yaml", "outside the output folder", {**base, "methods": ["clora"],
        "method_params": {"clora": {"mask_dir": str(lora_folder)}}})
    put("dotdot.yaml", r"'\.\.' is not allowed|outside the output folder", {**base, "methods": ["clora"],
        "method_params": {"clora": {"mask_dir": "../escape"}}})
    put("no_model.yaml", "needs a 'model'", {k: v for k, v in base.items() if k != "model"})
    put("missing_lora.yaml", "no such LoRA file", {**base, "loras": [{"path": str(folder / "nope.safetensors")}]})
    put("unknown_field.yaml", "unknown field", {**base, "colour": "red"})
    put("a_list.yaml", "must be a mapping", "- 1\n- 2\n")
    put("empty.yaml", "must be a mapping", "")
    put("not_utf8.yaml", "not UTF-8", b"model: tiny:sd1\nprompts: ['\xff\xfe']\n")
    put("not_yaml.yaml", "not valid YAML", "model: [tiny\n")
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
    put("alias_bomb.yaml", "expands to more than", bomb)
    put("too_big.yaml", "too large", lambda p: p.write_bytes(b"# " + b"x" * (5 << 20) + b"\n"))
    put("fifo.yaml", "not a regular file", lambda p: os.mkfifo(p))
    put("folder.yaml", "not a regular file", lambda p: p.mkdir())
    return out


def png_corpus(folder: Path, good_spec: dict, lora_folder: Path) -> list[Hostile]:
    """PNGs for `--from-png` and the UI's Reproduce: from elsewhere, damaged, or carrying a hostile spec."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []

    def png(name: str, expect: str, spec: dict | str | None = None, parameters: str | None = None, size=(8, 8)) -> None:
        info = PngImagePlugin.PngInfo()
        if spec is not None:
            info.add_itxt("loraloom", spec if isinstance(spec, str) else json.dumps(spec))
        if parameters is not None:
            info.add_text("parameters", parameters)
        Image.new("RGB", size, (90, 90, 90)).save(folder / name, pnginfo=info)
        out.append(Hostile(name, folder / name, expect))

    png("plain.png", "not made by loraloom")
    png("a1111.png", "not made by loraloom", parameters="a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7")
    png("bad_json.png", "not valid JSON", spec="{not json")
    png("steps_text.png", "steps must be a whole number", spec={**good_spec, "steps": "abc"})
    png("unknown_method.png", "unknown method", spec={**good_spec, "method": "teleport"})
    png("write_outside.png", "outside the output folder", spec={**good_spec, "method": "ziplora",
        "method_params": {"save_merged": str(folder.parent / "elsewhere" / "x.safetensors")}})
    png("write_into_loras.png", "outside the output folder", spec={**good_spec, "method": "clora",
        "method_params": {"mask_dir": str(lora_folder)}})
    good = folder / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    (folder / "truncated.png").write_bytes(good.read_bytes()[:20])
    out.append(Hostile("truncated.png", folder / "truncated.png", "cannot be read as an image"))
    (folder / "not_png.png").write_text("hello")
    out.append(Hostile("not_png.png", folder / "not_png.png", "cannot be read as an image"))
    # a decompression bomb: a few hundred bytes whose header claims 60000 x 60000 pixels
    (folder / "bomb.png").write_bytes(_png_claiming(60000, 60000))
    out.append(Hostile("bomb.png", folder / "bomb.png", "cannot be read as an image"))
    return out


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says `width` x `height` (8-bit grey) and whose data is one compressed row of zeros."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b"")
