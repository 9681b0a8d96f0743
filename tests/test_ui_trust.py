"""The web UI's answers can be trusted (issue 21), through `gradio_client` against a served app: errors come back as
plain text (unexpected ones as one line, logged with their traceback), Reproduce restores what it can and lists
the rest, uploads are limited per type at the HTTP layer and leave nothing behind, per-session page state is
bounded, only configured models load, and sidecar saves stay inside the LoRA's folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

pytest.importorskip("gradio")
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from loraloom.app.ui.sandbox import EXAMPLE_LORAS, serve, tiny_ui_world  # noqa: E402
from loraloom.composition.errors import LoraloomError  # noqa: E402

PAIR = [["tiny_character", 1.0], ["tiny_style", 0.8]]
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world, served with small upload limits (PNG 20 kB, LoRA 0.5 MB), at most 4 sessions kept, and its
    own Gradio temporary folder (so leftovers of this app's uploads can be counted)."""
    root = tmp_path_factory.mktemp("ui-trust")
    uploads = root / "gradio-tmp"
    uploads.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(uploads))
        config = tiny_ui_world(root, clip=False)
        config.max_png_mb, config.max_lora_mb, config.max_sessions = 0.02, 0.5, 4
        with serve(config) as (demo, url):
            client = Client(url, verbose=False, download_files=str(root / "downloads"))
            yield {"root": root, "config": config, "demo": demo, "url": url, "client": client, "uploads": uploads}


def generate(client, loras=PAIR, method="merge", params=None, model="tiny:sd1", seed=0, steps=2):
    return client.predict(model, "a portrait, {triggers}", "blurry", loras, method, params or {}, steps, 7.5, 32, 32,
                          "ddim", seed, api_name="/generate")


def leftovers(world, name: str) -> list[Path]:
    """Files called `name` anywhere in the app's Gradio temporary folder."""
    return [p for p in world["uploads"].rglob("*") if p.is_file() and p.name == name]


# --- 1. errors: plain text, one line, unexpected ones logged ------------------------------------------------------
def test_user_errors_come_back_as_plain_text(world):
    with pytest.raises(AppError) as caught:
        generate(world["client"], loras=[["a<b>&c->d", 1.0]])
    message = str(caught.value)
    assert "no LoRA named 'a<b>&c->d'" in message and "pick one from the list" in message
    assert "&lt;" not in message and "&gt;" not in message and "&amp;" not in message


def test_method_parameters_of_the_wrong_type_are_refused_by_name(world):
    with pytest.raises(AppError, match=r"composite\.max_batch must be a (whole )?number, got 'abc'"):
        generate(world["client"], method="composite", params={"max_batch": "abc"})


def test_unexpected_errors_are_one_line_and_logged_with_a_traceback(world, monkeypatch, caplog):
    service = world["demo"].service

    def broken(*args, **kwargs):
        raise AttributeError(f"'NoneType' object has no attribute 'init_noise_sigma' ({world['uploads']}/x/y.png)")

    monkeypatch.setattr(service, "generate", broken)
    with caplog.at_level(logging.ERROR, logger="loraloom.app.ui.wiring"):
        with pytest.raises(AppError) as caught:
            generate(world["client"])
    message = str(caught.value)
    assert "\n" not in message and "unexpected AttributeError" in message and "server log" in message
    assert "init_noise_sigma" not in message and str(world["uploads"]) not in message and "Traceback" not in message
    records = [r for r in caplog.records if r.exc_info and "init_noise_sigma" in str(r.exc_info[1])]
    assert records, "the unexpected error was not logged with its traceback"
    ref = message.split("reference ")[1].split(".")[0]
    assert ref in records[0].getMessage()


def test_compare_lists_a_failed_method_in_plain_text(world, monkeypatch):
    service = world["demo"].service
    original = service.generate

    def some_fail(spec, *args, **kwargs):
        if spec.method == "composite":
            raise LoraloomError("composite needs <two> LoRAs & more")
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(service, "generate", some_fail)
    gallery, table, status = world["client"].predict(
        "tiny:sd1", "p", "", PAIR, ["merge", "composite"], {}, 2, 7.5, 32, 32, "ddim", 0, api_name="/compare")
    rows = {r[0]: r for r in table["data"]}
    assert rows["composite"][-1] == "composite needs <two> LoRAs & more" and rows["merge"][-1] == ""
    assert "composite needs <two> LoRAs & more" in status and "&lt;" not in status and len(gallery) == 1


def test_errors_do_not_show_the_path_of_the_temporary_upload(world, tmp_path):
    plain = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(AppError) as caught:
        world["client"].predict(handle_file(plain), api_name="/reproduce")
    assert "holiday.png" in str(caught.value) and "not made by loraloom" in str(caught.value)
    assert str(world["uploads"]) not in str(caught.value)


# --- 2. reproduce: restore what can be restored, list the rest -------------------------------------------------
def _edited_png(src: str, dst: Path, **changes) -> Path:
    """A copy of a loraloom PNG whose spec has `changes` (what a hand-edited or foreign PNG could carry)."""
    with Image.open(src) as im:
        spec = json.loads(im.text["loraloom"])
        spec.update(changes)
        info = PngImagePlugin.PngInfo()
        info.add_itxt("loraloom", json.dumps(spec))
        im.save(dst, pnginfo=info)
    return dst


def _outputs(out) -> dict:
    """The /reproduce outputs by name (model, prompt, negative, LoRA names and weights, method, the method parameters
    as "method.name", steps, cfg, height, width, scheduler, seed, note, spec). Since issue 22 /reproduce returns the
    settings to restore (a dict: what it leaves out is not restored), the note and the spec; the page fills the form
    from the settings in a step of its own."""
    settings, note, spec = out
    loras = settings.get("loras") or []
    named = {"model": settings.get("model"), "prompt": settings.get("prompt"), "negative": settings.get("negative_prompt"),
             **{f"lora{k}": e["name"] for k, e in enumerate(loras)}, **{f"weight{k}": e["weight"] for k, e in enumerate(loras)},
             "method": settings.get("method"), "steps": settings.get("steps"), "cfg": settings.get("guidance_scale"),
             "height": settings.get("height"), "width": settings.get("width"), "scheduler": settings.get("scheduler"),
             "seed": settings.get("seed"), "note": note, "spec": spec}
    for method, params in (settings.get("method_params") or {}).items():
        named.update({f"{method}.{k}": v for k, v in params.items()})
    return named


def test_reproduce_restores_what_it_can_when_the_model_is_not_here(world, tmp_path):
    client = world["client"]
    png = generate(client, method="switch", params={"switch_interval": 2}, seed=21)[1]
    edited = _edited_png(png, tmp_path / "from_elsewhere.png", model="someone/not-here-v1", steps="abc",
                         method_params={"switch_interval": "often", "order": "given"})
    out = _outputs(client.predict(handle_file(edited), api_name="/reproduce"))
    assert out["seed"] == 21 and out["prompt"] == "a portrait, ohwx person, red hair, ink wash style"
    assert [out["lora0"], out["lora1"]] == ["tiny_character", "tiny_style"] and out["method"] == "switch"
    assert out["switch.order"] == "given"
    note = out["note"]
    assert "base model not restored" in note and "someone/not-here-v1" in note
    assert "steps not restored: steps must be" in note and "'abc'" in note
    assert "switch.switch_interval not restored" in note and "'often'" in note
    assert out["model"] != "someone/not-here-v1" and out["steps"] != "abc" and out.get("switch.switch_interval") != "often"
    assert json.loads(out["spec"])["steps"] == "abc"  # the spec as the PNG carries it


def test_reproduce_lists_file_parameters_the_write_policy_refuses(world, tmp_path):
    from loraloom.composition.methods import available_methods

    if "ziplora" not in available_methods():
        pytest.skip("ziplora (a method that writes files) is not registered")
    client = world["client"]
    png = generate(client, seed=22)[1]
    lora_dir = world["config"].lora_dirs[0]
    edited = _edited_png(png, tmp_path / "writes.png", method="ziplora",
                         method_params={"save_merged": "/etc/cron.d/loraloom", "coefficients": str(lora_dir / "c.pt")})
    out = _outputs(client.predict(handle_file(edited), api_name="/reproduce"))
    note = out["note"]
    assert "ziplora.save_merged not restored" in note and "/etc/cron.d/loraloom" in note
    assert "ziplora.coefficients not restored" in note and "c.pt" in note
    assert out.get("ziplora.save_merged") != "/etc/cron.d/loraloom"
    assert out.get("ziplora.coefficients") != str(lora_dir / "c.pt")
    assert out["method"] == "ziplora" and out["seed"] == 22


# --- 3. uploads ------------------------------------------------------------------------------------------------
def _noise_png(path: Path, side: int = 120) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def test_uploads_are_limited_per_type_at_the_http_layer(world, tmp_path):
    url = world["url"] + "gradio_api/upload"
    big_png = _noise_png(tmp_path / "big_noise.png")
    assert big_png.stat().st_size > 20_000
    r = httpx.post(url, files=[("files", (big_png.name, big_png.read_bytes()))])
    assert r.status_code == 413 and "a .png file may be at most 20 kB" in r.text
    assert not leftovers(world, big_png.name)
    lora = (EXAMPLE_LORAS / "tiny_style.safetensors").read_bytes()  # 116 kB: over the PNG limit, under the LoRA one
    r = httpx.post(url, files=[("files", ("fits.safetensors", lora))])
    assert r.status_code == 200, r.text
    r = httpx.post(url, files=[("files", ("huge.safetensors", lora * 5))])
    assert r.status_code == 413 and "a .safetensors file may be at most 500 kB" in r.text
    r = httpx.post(url, files=[("files", ("notes.txt", lora))])  # other types: the smallest limit
    assert r.status_code == 413
    with pytest.raises(httpx.HTTPStatusError, match="413"):
        world["client"].predict(handle_file(big_png), api_name="/reproduce")
    assert not leftovers(world, big_png.name) and not leftovers(world, "huge.safetensors")


def test_refused_and_used_uploads_leave_no_temporary_file(world, tmp_path):
    client = world["client"]
    bad = tmp_path / "not_a_lora.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match="not a usable LoRA"):
        client.predict(handle_file(bad), api_name="/add_lora")
    fake = tmp_path / "fake_image.png"
    fake.write_text("not a png at all")
    with pytest.raises(AppError, match="not a PNG"):
        client.predict(handle_file(fake), api_name="/reproduce")
    notes = tmp_path / "notes.txt"  # a type no control takes: refused by the handler, which deletes it
    notes.write_text("hello")
    with pytest.raises(AppError, match=r"'notes.txt' is not a \.png file"):
        client.predict(handle_file(notes), api_name="/reproduce")
    with pytest.raises(AppError, match=r"'notes.txt' is not a \.safetensors file"):
        client.predict(handle_file(notes), api_name="/add_lora")
    good = tmp_path / "kept_style.safetensors"
    shutil.copyfile(EXAMPLE_LORAS / "tiny_style.safetensors", good)
    client.predict(handle_file(good), api_name="/add_lora")
    png = generate(client, seed=23)[1]
    client.predict(handle_file(png), api_name="/reproduce")
    for name in (bad.name, fake.name, notes.name, good.name, Path(png).name):
        assert not leftovers(world, name), f"{name} was left in the temporary folder"
    assert (world["config"].lora_dirs[0] / "kept_style.safetensors").exists()


def test_an_upload_never_replaces_a_lora_or_a_sidecar(world, tmp_path):
    client = world["client"]
    lora_dir = world["config"].lora_dirs[0]
    (lora_dir / "orphan.yaml").write_text("category: style\ntriggers: [hand written]\n")
    (lora_dir / "dangling.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    before = {p.name: p.read_bytes() for p in lora_dir.iterdir() if p.is_file()}
    for name in ("orphan.safetensors", "dangling.safetensors", "tiny_style.safetensors"):
        upload = tmp_path / name
        shutil.copyfile(EXAMPLE_LORAS / "tiny_character.safetensors", upload)
        with pytest.raises(AppError, match="already exists in the library"):
            client.predict(handle_file(upload), api_name="/add_lora")
    assert {p.name: p.read_bytes() for p in lora_dir.iterdir() if p.is_file()} == before
    assert not (lora_dir / "orphan.safetensors").exists() and (lora_dir / "dangling.safetensors").is_symlink()


# --- 4. per-session memory ---------------------------------------------------------------------------------------
def test_page_state_of_old_sessions_is_released(world):
    import uuid

    holder = world["demo"].state_holder
    client = Client(world["url"], verbose=False, download_files=False)
    for _ in range(10):  # new client sessions (a new session hash is a new session), one cheap call each
        client.session_hash = str(uuid.uuid4())
        client.predict(api_name="/library")
    assert len(holder.session_data) <= world["config"].max_sessions


# --- 5. only configured models ----------------------------------------------------------------------------------
def test_only_configured_models_can_be_loaded(world):
    client = world["client"]
    service = world["demo"].service
    generate(client, seed=24)
    loaded = service.cache.pipeline
    for model in ("tiny:sdxl", "runwayml/stable-diffusion-v1-5"):
        with pytest.raises(AppError, match="is not offered here.*--model"):
            client.predict(model, 32, 32, api_name="/load_model")
        with pytest.raises(AppError, match="is not offered here"):
            generate(client, model=model)
    assert service.cache.pipeline is loaded  # nothing else was loaded in its place
    assert "ready" in client.predict("tiny:sd1", 32, 32, api_name="/load_model")[-1]


# --- 6. sidecar saves stay in the LoRA's folder ------------------------------------------------------------------
def _add_lora(world, name: str) -> Path:
    path = world["config"].lora_dirs[0] / f"{name}.safetensors"
    shutil.copyfile(EXAMPLE_LORAS / "tiny_style.safetensors", path)
    return path


def test_sidecar_links_and_special_files_are_not_written_through(world, tmp_path):
    client = world["client"]
    outside = tmp_path / "outside.json"
    outside.write_text('{"category": "style"}')
    _add_lora(world, "linked_side").with_suffix(".json").symlink_to(outside)
    inner = _add_lora(world, "inner_side")
    (inner.parent / "inner_target.txt").write_text('{"category": "style"}')
    inner.with_suffix(".json").symlink_to(inner.parent / "inner_target.txt")
    fifo = _add_lora(world, "fifo_side").with_suffix(".json")
    os.mkfifo(fifo)
    client.predict(api_name="/library")
    for name in ("linked_side", "inner_side", "fifo_side"):
        with pytest.raises(AppError):
            client.predict(name, "character", "new words", api_name="/save_metadata")
    assert outside.read_text() == '{"category": "style"}'
    assert (inner.parent / "inner_target.txt").read_text() == '{"category": "style"}'
    assert inner.with_suffix(".json").is_symlink() and fifo.exists() and not fifo.is_file()


def test_a_hand_written_sidecar_is_updated_with_its_other_keys_kept(world):
    client = world["client"]
    lora = _add_lora(world, "hand_made")
    side = lora.with_suffix(".yaml")
    side.write_text("# my notes\ncategory: style\ntriggers: [old words]\nsource: https://example.org/hand_made\n")
    client.predict(api_name="/library")
    table, _, note, *_ = client.predict("hand_made", "background", "misty hills", api_name="/save_metadata")
    import yaml

    assert yaml.safe_load(side.read_text()) == {"category": "background", "triggers": ["misty hills"],
                                                "source": "https://example.org/hand_made"}
    assert "hand_made.yaml" in note
    assert not [p for p in lora.parent.iterdir() if p.name.startswith(".tmp-loraloom-")]  # written atomically

