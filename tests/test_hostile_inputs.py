"""The hostile-input suite: every input of tests/hostile_corpus.py through every entry point.

For each (input, entry point): a clear error naming the problem, no traceback, no file changed outside the output
folder (the LoRA folder and the shipped model are hashed before and after), the base weights bit-identical, and
the next ordinary request still served. Entry points: the CLI (in-process `loraloom.app.cli.main`, as a user's
shell would see it: exit code and stderr), the Python API, and the web UI's API (gradio_client against a served
app). `COUNTS` records what ran, for the closing summary test.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from hostile_corpus import lora_corpus, png_corpus, spec_corpus

from loraloom.app.cli import main
from loraloom.composition.errors import LoraloomError
from loraloom.pipelines.tiny import write_random_lora

COUNTS: Counter = Counter()


def _tree_hash(folder: Path) -> str:
    """Names, kinds and bytes of everything under `folder` (FIFOs and folders by name only)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_symlink():
            h.update(b"link:" + str(p.readlink()).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    from loraloom.pipelines import ComposedPipeline

    cp = ComposedPipeline.from_pretrained("tiny:sd1")
    loras = root / "loras"
    good = write_random_lora(cp.pipe, loras / "good.safetensors", seed=1, triggers=("ohwx",), category="character")
    style = write_random_lora(cp.pipe, loras / "style.safetensors", seed=2, triggers=("inkw",), category="style")
    corpus_loras = lora_corpus(root / "bad_loras", good)
    specs = spec_corpus(root / "specs", good, loras)
    good_spec = {"model": "tiny:sd1", "prompt": "a star", "loras": [{"path": str(good)}], "steps": 2, "height": 32, "width": 32}
    pngs = png_corpus(root / "pngs", good_spec, loras)
    return {"root": root, "cp": cp, "good": good, "style": style, "loras": corpus_loras, "specs": specs, "pngs": pngs, "lora_dir": loras}


@pytest.fixture
def guarded(world):
    """Hash the folders nothing may write (the LoRA folders) and the model's weights before; check after."""
    from conftest import weights_hash

    cp = world["cp"]
    folders = [world["lora_dir"], world["root"] / "bad_loras"]
    before = [_tree_hash(f) for f in folders], weights_hash(cp.pipe.unet) + weights_hash(cp.pipe.text_encoder)
    yield
    (folders[0] / "sdxl.safetensors").unlink(missing_ok=True)  # the one upload that was accepted (a sound file)
    after = [_tree_hash(f) for f in folders], weights_hash(cp.pipe.unet) + weights_hash(cp.pipe.text_encoder)
    assert after == before, "a file outside the output folder or a base weight changed"
    assert not (world["root"] / "elsewhere").exists()


def _cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code: int, err: str, expect: str, what: str) -> None:
    assert code == 2, f"{what}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{what}: traceback\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("loraloom: error:")]
    assert len(lines) == 1, f"{what}: expected one error line\n{err}"
    assert re.search(expect, lines[0]), f"{what}: {lines[0]!r} does not mention {expect!r}"


# --- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_refuses_every_bad_spec_in_one_line(world, guarded, capsys, one_thread):
    for item in world["specs"]:
        code, err = _cli(["generate", str(item.path), "--out", str(world["root"] / "out")], capsys)
        _assert_one_line_error(code, err, item.expect, f"spec {item.name}")
        COUNTS["cli spec"] += 1
    assert not list((world["root"] / "out").rglob("*.png")) if (world["root"] / "out").exists() else True


def test_cli_refuses_every_bad_lora_in_one_line(world, guarded, capsys, one_thread, tmp_path):
    import yaml

    for item in world["loras"]:
        spec = tmp_path / f"{item.name}.yaml"
        spec.write_text(yaml.safe_dump({"model": "tiny:sd1", "loras": [{"path": str(item.path)}], "prompts": ["a star"],
                                        "methods": ["merge"], "steps": 2, "height": 32, "width": 32}))
        code, err = _cli(["generate", str(spec), "--out", str(tmp_path / "out")], capsys)
        _assert_one_line_error(code, err, item.expect, f"LoRA {item.name}")
        COUNTS["cli lora"] += 1
    assert not list((tmp_path / "out").rglob("*.png")) if (tmp_path / "out").exists() else True


def test_cli_refuses_every_bad_png_in_one_line(world, guarded, capsys, one_thread, tmp_path):
    for item in world["pngs"]:
        code, err = _cli(["generate", "--from-png", str(item.path), "--out", str(tmp_path / "out")], capsys)
        _assert_one_line_error(code, err, item.expect, f"PNG {item.name}")
        COUNTS["cli png"] += 1
    # the next ordinary request is served
    good = world["root"] / "good_spec.yaml"
    import yaml

    good.write_text(yaml.safe_dump({"model": "tiny:sd1", "loras": [{"path": str(world["good"])}], "prompts": ["a star"],
                                    "methods": ["merge"], "steps": 2, "height": 32, "width": 32}))
    assert main(["generate", str(good), "--out", str(tmp_path / "ok")]) == 0
    assert len(list((tmp_path / "ok").glob("*.png"))) == 1


def test_cli_debug_shows_the_traceback(world, capsys):
    item = next(i for i in world["specs"] if i.name == "steps_zero.yaml")
    with pytest.raises(LoraloomError):
        main(["--debug", "generate", str(item.path)])


# --- Python API -----------------------------------------------------------------------------------------------------
def test_python_api_raises_loraloom_errors_for_every_bad_lora(world, guarded, one_thread):
    cp = world["cp"]
    for item in world["loras"]:
        with pytest.raises(LoraloomError, match=item.expect):
            cp.load_lora(item.path, "hostile")
        assert "hostile" not in cp.loras and all("hostile" not in r.adapters for r in cp.routers.values())
        COUNTS["python lora"] += 1
    out = cp("a star", loras=[], num_inference_steps=2, height=32, width=32, output_type="latent", progress_bar=False)
    assert torch.isfinite(out.latents).all()


def test_python_api_raises_loraloom_errors_for_every_bad_spec_and_png(world, guarded, one_thread):
    from loraloom.pipelines.batch import load_batch_spec
    from loraloom.pipelines.spec import read_png_spec

    for item in world["specs"]:
        with pytest.raises(LoraloomError, match=item.expect):
            from loraloom.pipelines.batch import check_written_paths, expand

            batch = load_batch_spec(item.path)
            specs = expand(batch)
            check_written_paths(specs, world["root"] / "specs" / "out")
        COUNTS["python spec"] += 1
    for item in world["pngs"]:
        with pytest.raises(LoraloomError, match=item.expect):
            from loraloom.pipelines.batch import check_written_paths

            check_written_paths([read_png_spec(item.path)], world["root"] / "png_out")
        COUNTS["python png"] += 1


def test_python_api_method_paths_never_write_model_or_lora_files(world, guarded, one_thread, tmp_path):
    """Every method parameter that names a file it writes, pointed at a resident LoRA and its sidecar, through the
    Python API: refused before any work, the files untouched."""
    from loraloom.composition.methods import REGISTRY

    cp = world["cp"]
    cp.load_lora(world["good"], "resident")
    cp.load_lora(world["style"], "resident_style")
    try:
        for method, cls in REGISTRY.items():
            import dataclasses

            for f in dataclasses.fields(cls.Params):
                if not f.metadata.get("writes"):
                    continue
                for target in (world["good"], world["good"].with_suffix(".json")):
                    # refused as a write, or (a coefficient file that exists is read) as not a coefficient file
                    with pytest.raises(LoraloomError, match="model or LoRA file or folder|not made by loraloom|not a loraloom"):
                        cp("a ohwx star, inkw", loras=["resident", "resident_style"], method=method,
                           method_params={f.name: str(target)}, num_inference_steps=2, height=32, width=32,
                           output_type="latent", progress_bar=False)
                    COUNTS["python path param"] += 1
    finally:
        cp.remove_lora("resident")
        cp.remove_lora("resident_style")
    assert COUNTS["python path param"] >= 8  # clora.mask_dir, cmlora.profile_cache, ziplora.save_merged, ziplora.coefficients


# --- the web UI's API -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    pytest.importorskip("gradio")
    from gradio_client import Client

    from loraloom.app.ui.sandbox import serve, tiny_ui_world

    root = tmp_path_factory.mktemp("hostile-ui")
    config = tiny_ui_world(root, clip=False)
    with serve(config) as (demo, url):
        yield {"config": config, "demo": demo, "client": Client(url, verbose=False, download_files=str(root / "dl"))}


def _ui_outcome(call) -> str:
    """The text a UI user sees: the error message, or the status line of a result."""
    from gradio_client.exceptions import AppError

    try:
        result = call()
    except AppError as err:
        return "error: " + str(err)
    values = result if isinstance(result, (list, tuple)) else [result]
    return "ok: " + " ".join(str(v) for v in values if isinstance(v, str))


def test_ui_api_answers_every_hostile_input_clearly(ui, world, one_thread_module):
    from conftest import weights_hash
    from gradio_client import handle_file

    client, config = ui["client"], ui["config"]
    service = ui["demo"].service
    cp = service.pipeline(config.models[0])
    folders = [Path(d) for d in config.lora_dirs]
    (folders[0] / "sdxl.safetensors").unlink(missing_ok=True)  # a previous run's accepted upload
    before = [_tree_hash(f) for f in folders], weights_hash(cp.pipe.unet) + weights_hash(cp.pipe.text_encoder)
    seen = []
    for item in world["loras"]:
        if not item.path.is_file():
            continue  # a FIFO or a folder cannot be uploaded
        text = _ui_outcome(lambda item=item: client.predict(handle_file(item.path), api_name="/add_lora"))
        if text.startswith("ok:"):  # a sound LoRA of another family may join the library; using it here is refused
            assert "sdxl" in text, (item.name, text)
            name = item.path.stem
            text = _ui_outcome(lambda name=name: client.predict(config.models[0], "p", "", [[name, 1.0]], "merge", {}, 2, 7.5,
                                                                32, 32, "ddim", 0, api_name="/generate"))
        seen.append(("lora", item.name, text))
        assert text.startswith("error:") and re.search(item.expect, text), (item.name, text)
        COUNTS["ui lora"] += 1
    for item in world["pngs"]:
        text = _ui_outcome(lambda item=item: client.predict(handle_file(item.path), api_name="/reproduce"))
        seen.append(("png", item.name, text))
        if item.name == "a1111.png":  # the UI's Import tab reads A1111's own text (issue 22); the CLI still refuses it
            assert re.match(r"ok: imported the settings of `a1111\.png` \(A1111", text), (item.name, text)
        else:
            assert re.search(f"{item.expect}|[Nn]ot restored|refused|cannot be read as a PNG|is not a PNG image", text), (item.name, text)
        COUNTS["ui png"] += 1
    for params, expect in (({"mask_dir": "/tmp/elsewhere"}, "outside the folders"), ({"mask_dir": str(folders[0])}, "outside the folders"),
                           ({"mask_dir": "../up"}, r"'\.\.'"), ({"refine_iterations": "many"}, "must be a whole number"), ({"max_iterations": 3}, "has no parameter")):
        text = _ui_outcome(lambda params=params: client.predict(config.models[0], "a portrait, {triggers}", "", [["tiny_character", 1.0]],
                                                                "clora", params, 2, 7.5, 32, 32, "ddim", 0, api_name="/generate"))
        seen.append(("generate", str(params), text))
        assert text.startswith("error:") and re.search(expect, text), (params, text)
        COUNTS["ui generate"] += 1
    for _, _, text in seen:
        assert "Traceback" not in text and "/tmp/gradio" not in text
    (folders[0] / "sdxl.safetensors").unlink(missing_ok=True)  # the one upload that was accepted (a sound file)
    after = [_tree_hash(f) for f in folders], weights_hash(cp.pipe.unet) + weights_hash(cp.pipe.text_encoder)
    assert after == before
    ok = _ui_outcome(lambda: client.predict(config.models[0], "a portrait, {triggers}", "", [["tiny_character", 1.0]], "merge", {},
                                            2, 7.5, 32, 32, "ddim", 0, api_name="/generate"))
    assert "done" in ok  # still serving


def test_zz_counts(capsys):
    """The suite's size, for the closing note (runs last in this file)."""
    with capsys.disabled():
        print("\nhostile inputs x entry points:", dict(COUNTS), "total", sum(COUNTS.values()))
    assert sum(COUNTS.values()) >= 80 or not COUNTS


def test_written_files_get_the_umask_mode_and_stale_temps_of_dead_processes_go(tmp_path):
    """PNGs and other files are created as open() would create them (0644 under the usual umask 022), not 0600; a
    temporary file a killed process left is removed, one of a live process is kept."""
    import os
    import subprocess
    import sys

    from PIL import Image

    from loraloom.composition.files import TEMP_PREFIX, WritePolicy, remove_stale_temps
    from loraloom.pipelines.spec import GenerationSpec, save_png

    old = os.umask(0o022)
    try:
        path = save_png(Image.new("RGB", (8, 8)), "x.png", GenerationSpec(model="tiny:sd1", prompt="p"), WritePolicy.at(tmp_path))
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f"{TEMP_PREFIX}{dead}-abc.png").write_bytes(b"half")
    (tmp_path / f"{TEMP_PREFIX}{os.getpid()}-def.png").write_bytes(b"mine")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [f"{TEMP_PREFIX}{dead}-abc.png"] and (tmp_path / f"{TEMP_PREFIX}{os.getpid()}-def.png").exists()
