"""The web UI through its API, as `gradio_client` sees it: the app runs in this process on a free 127.0.0.1 port
with the tiny model, the example LoRAs (plus a damaged file and a symlink out) and a tiny random CLIP."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from loraloom.app.ui.sandbox import serve, tiny_ui_world  # noqa: E402
from loraloom.pipelines.spec import read_png_spec  # noqa: E402

PAIR = [["tiny_character", 1.0], ["tiny_style", 0.8]]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    config = tiny_ui_world(root)
    with serve(config) as (demo, url):
        client = Client(url, verbose=False, download_files=str(root / "downloads"))
        yield {"root": root, "config": config, "demo": demo, "url": url, "client": client}


def generate(client, loras=PAIR, method="merge", params=None, steps=2, height=32, width=32, seed=0, model="tiny:sd1",
             prompt="a portrait, {triggers}", scheduler="dpmsolver++"):
    return client.predict(model, prompt, "blurry", loras, method, params or {}, steps, 7.5, height, width, scheduler,
                          seed, api_name="/generate")


def test_serves_on_localhost_with_named_endpoints(world):
    assert world["url"].startswith("http://127.0.0.1:")
    api = world["client"].view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/generate", "/compare", "/reproduce", "/library", "/save_metadata", "/add_lora", "/load_model",
                 "/grid", "/history", "/history_settings", "/score", "/make_preview", "/set_preview"):
        assert name in api
    params = [p["parameter_name"] for p in api["/generate"]["parameters"]]
    # issue 22/23 added regions, base_weight and batch_count at the end (with defaults: old calls still work)
    assert params == ["model", "prompt", "negative_prompt", "loras", "method", "method_params", "steps",
                      "guidance_scale", "height", "width", "scheduler", "seed", "regions", "base_weight", "batch_count"]


def test_only_the_output_folder_is_served(world):
    import httpx

    lora = world["config"].lora_dirs[0] / "tiny_style.safetensors"
    for path in (lora, Path("/etc/passwd"), Path(__file__)):
        assert httpx.get(f"{world['url']}gradio_api/file={path}").status_code == 403
    _, png, *_ = generate(world["client"])
    served = world["config"].output_dir / Path(png).name
    assert httpx.get(f"{world['url']}gradio_api/file={served}").status_code == 200


def test_login_when_auth_is_set(world):
    import httpx

    with serve(world["config"], service=world["demo"].service, auth=("ann", "s3cret")) as (_, url):
        assert httpx.get(f"{url}config").status_code == 401
        with pytest.raises(Exception):
            Client(url, verbose=False)
        client = Client(url, auth=("ann", "s3cret"), verbose=False, download_files=False)
        assert "done" in generate(client)[-1]


def test_generate_writes_png_with_spec(world):
    preview, png, result, spec_json, status = generate(world["client"], method="switch", params={"switch_interval": 1},
                                                       height=32, width=48, seed=3)
    assert "done" in status
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (48, 32)
    spec = read_png_spec(png)  # the downloaded file still carries the spec (not re-encoded)
    assert spec.method == "switch" and spec.changed_params() == {"switch_interval": 1} and spec.seed == 3  # every param recorded
    assert [l.name for l in spec.loras] == ["tiny_character", "tiny_style"]
    assert spec.prompt == "a portrait, ohwx person, red hair, ink wash style"  # {triggers} expanded
    assert json.loads(spec_json)["seed"] == 3
    assert Path(result["file"]).parent == world["config"].output_dir and Path(result["file"]).exists()
    assert Path(png).name == Path(result["file"]).name
    assert preview and Image.open(preview).size == (48, 32)  # the last per-step preview


def test_compare_shows_clipscore_and_time_per_method(world):
    gallery, table, status = world["client"].predict(
        "tiny:sd1", "a portrait", "", PAIR, ["merge", "switch", "composite"], {"switch": {"switch_interval": 1}},
        2, 7.5, 32, 32, "dpmsolver++", 5, api_name="/compare")
    assert [row[0] for row in table["data"]] == ["merge", "switch", "composite"]
    for _method, score, seconds, name, error in table["data"]:
        assert error == "" and 0 <= score <= 100 and seconds > 0
        assert read_png_spec(world["config"].output_dir / name).seed == 5
    assert len(gallery) == 3
    assert all("CLIPScore" in g["caption"] and " s" in g["caption"] for g in gallery)
    assert read_png_spec(gallery[1]["image"]).method_params["switch_interval"] == 1  # the PNG records every parameter


def test_reproduce_restores_settings_and_pixels(world):
    client = world["client"]
    _, png, *_ = generate(client, method="switch", params={"switch_interval": 2, "order": "given"},
                                loras=[["tiny_style", 0.6], ["tiny_character", 1.2]], seed=11, steps=3)
    out = client.predict(handle_file(png), api_name="/reproduce")
    spec = json.loads(out[-1])
    assert spec["seed"] == 11 and spec["method"] == "switch"
    settings = out[0]  # issue 22: /reproduce returns the settings (a dict), the note and the spec; the page fills the form
    model, prompt, negative = settings["model"], settings["prompt"], settings["negative_prompt"]
    names, weights = [e["name"] for e in settings["loras"]], [e["weight"] for e in settings["loras"]]
    assert model == "tiny:sd1" and negative == "blurry"
    assert list(names[:2]) == ["tiny_style", "tiny_character"] and list(weights[:2]) == [0.6, 1.2]
    assert "restored the settings" in out[-2]
    # same settings again -> the same pixels
    again = client.predict(model, prompt, negative, [[n, w] for n, w in zip(names, weights) if n], spec["method"],
                           spec["method_params"], spec["steps"], spec["guidance_scale"], spec["height"], spec["width"],
                           spec["scheduler"], spec["seed"], api_name="/generate")[1]
    a = np.asarray(Image.open(png).convert("RGB"))
    b = np.asarray(Image.open(again).convert("RGB"))
    assert a.shape == b.shape and np.array_equal(a, b)


def test_reproduce_refuses_files_that_are_not_loraloom_pngs(world, tmp_path):
    client = world["client"]
    fake = tmp_path / "fake.png"
    fake.write_text("not a png at all")
    with pytest.raises(AppError, match="not a PNG"):
        client.predict(handle_file(fake), api_name="/reproduce")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(AppError, match="not made by loraloom"):
        client.predict(handle_file(plain), api_name="/reproduce")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AppError, match=r"\.png"):
        client.predict(handle_file(text), api_name="/reproduce")


@pytest.mark.parametrize("loras, model, message", [
    ([["/etc/passwd", 1.0]], "tiny:sd1", "outside the allowed folders"),
    ([["../outside/elsewhere.safetensors", 1.0]], "tiny:sd1", "'..' is not allowed"),
    ([["linked_out", 1.0]], "tiny:sd1", "symlink"),
    ([["linked_out.safetensors", 1.0]], "tiny:sd1", "symlink"),
    ([["tiny_style", 1.0]], "/etc", "outside the allowed folders"),
    ([["tiny_style", 1.0]], "../../etc", "'..' is not allowed"),
])
def test_paths_outside_the_folders_are_refused(world, loras, model, message):
    with pytest.raises(AppError, match=message):
        generate(world["client"], loras=loras, model=model)


def test_file_parameters_of_methods_are_refused_outside_the_folders(world):
    from loraloom.composition.methods import available_methods

    if "clora" not in available_methods():
        pytest.skip("no method with a file parameter is registered")
    with pytest.raises(AppError, match="clora.mask_dir.*outside the folders this run may write"):
        generate(world["client"], method="clora", params={"mask_dir": "/tmp/elsewhere"})
    # a LoRA folder is readable but never written
    lora_dir = world["config"].lora_dirs[0]
    with pytest.raises(AppError, match="clora.mask_dir .*loras/masks. lies outside the folders this run may write"):
        generate(world["client"], method="clora", params={"mask_dir": str(lora_dir / "masks")})
    assert not (lora_dir / "masks").exists()


def test_bad_lora_file_shows_error_and_app_keeps_serving(world):
    client = world["client"]
    table = client.predict(api_name="/library")[0]
    rows = {r[0]: r for r in table["data"]}
    assert rows["broken"][-1]  # the damaged file is listed with its error
    assert "refused" in rows["linked_out"][-1]
    assert rows["tiny_character"][6] == "yes"  # preview image beside the file
    with pytest.raises(AppError, match="broken.safetensors"):
        generate(client, loras=[["broken", 1.0]])
    with pytest.raises(AppError, match="not in the list of choices"):
        generate(client, method="no-such-method")
    assert "done" in generate(client)[-1]  # still serving


def test_lora_upload_is_checked_before_use(world, tmp_path):
    client = world["client"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match="not a usable LoRA"):
        client.predict(handle_file(bad), api_name="/add_lora")
    wrong = tmp_path / "model.ckpt"
    wrong.write_bytes(b"x" * 64)
    with pytest.raises(AppError, match="safetensors"):
        client.predict(handle_file(wrong), api_name="/add_lora")
    good = tmp_path / "my new style!.safetensors"
    good.write_bytes((world["config"].lora_dirs[0] / "tiny_style.safetensors").read_bytes())
    table, _, note, *_ = client.predict(handle_file(good), api_name="/add_lora")
    assert "my_new_style" in {r[0] for r in table["data"]} and "added" in note
    assert (world["config"].lora_dirs[0] / "my_new_style.safetensors").exists()
    with pytest.raises(AppError, match="already exists"):
        client.predict(handle_file(good), api_name="/add_lora")


def test_library_edit_is_saved_to_the_sidecar(world):
    client = world["client"]
    table, _, note, *_ = client.predict("tiny_style", "background", "misty hills, dawn", api_name="/save_metadata")
    side = json.loads((world["config"].lora_dirs[0] / "tiny_style.json").read_text())
    assert side == {"category": "background", "triggers": ["misty hills", "dawn"]}
    row = next(r for r in table["data"] if r[0] == "tiny_style")
    assert row[3] == "background" and row[4] == "misty hills, dawn"
    spec = read_png_spec(generate(client, loras=[["tiny_style", 1.0]], prompt="{triggers}")[1])
    assert spec.prompt == "misty hills, dawn" and spec.loras[0].category == "background"
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("tiny_style", "nonsense", "x", api_name="/save_metadata")


def test_twenty_concurrent_requests_queue_and_complete(world):
    service = world["demo"].service
    active, peak, lock = [0], [0], threading.Lock()
    original = service.generate

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    service.generate = counting
    client = Client(world["url"], verbose=False, download_files=False)  # results name server files; no downloads
    try:
        jobs = [client.submit("tiny:sd1", "p", "", PAIR, "switch", {}, 1, 7.5, 32, 32, "dpmsolver++", seed,
                              api_name="/generate") for seed in range(20)]
        ranks = set()
        deadline = time.time() + 240
        while not all(j.done() for j in jobs) and time.time() < deadline:
            ranks.update(st.rank for j in jobs if (st := j.status()).rank)
            time.sleep(0.2)
        results = [j.result(timeout=60) for j in jobs]
    finally:
        service.generate = original
    assert peak[0] == 1  # one generation at a time on the model
    assert ranks, "no request was ever reported waiting in the queue"
    seeds = sorted(read_png_spec(r[2]["file"]).seed for r in results)
    assert seeds == list(range(20))
