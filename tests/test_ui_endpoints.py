"""The web UI's issue-22 endpoints through `gradio_client` (no browser): `/grid` (the X/Y/Z plot, its cells reused
on a second run), `/reproduce` of an A1111 PNG (what maps and what does not), `/history` and `/history_settings`
(the output folder as a captioned gallery, a grid's axes restored), `/score` (CLIPScore table) and `/generate`'s
batch count and seed -1. One tiny-world server for the module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file  # noqa: E402

from loraloom.app.ui.sandbox import serve, tiny_ui_world  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
PAIR = [["tiny_character", 1.0], ["tiny_style", 0.8]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_endpoints")
    config = tiny_ui_world(root, hazards=False)
    config.preview_interval = 0  # a preview every step (for the page; API clients get none)
    with serve(config) as (demo, url):
        yield {"root": root, "config": config, "client": Client(url, verbose=False, download_files=str(root / "dl"))}


def grid(client, x, y="", z="", score=False, seed=0, method="merge"):
    return client.predict("tiny:sd1", "a portrait, {triggers}", "", PAIR, method, {}, 2, 7.5, 32, 32, "ddim", seed,
                          x, y, z, score, None, 0.0, api_name="/grid")


def test_grid_draws_labelled_cells_and_reuses_them(world):
    from PIL import Image

    client = world["client"]
    pages, files, table, status = grid(client, "method=merge,switch", "seed=0,1", score=True)
    assert "4 cells" in status and "(0 reused)" in status, status
    assert len(pages) == 1 and len(files) == 1 + 4  # the grid PNG, then each cell's PNG
    rows = table["data"]
    assert [(r[3], r[4]) for r in rows] == [("merge", 0), ("switch", 0), ("merge", 1), ("switch", 1)]
    assert all(isinstance(r[5], float) for r in rows)  # CLIPScore per cell, in the table (not over the images)
    with Image.open(pages[0]["image"]) as im:
        assert im.width > 2 * 32 and im.height > 2 * 32  # cells plus the axis labels drawn around them
    cells = sorted(Path(f).name for f in files[1:])
    again = grid(client, "method=merge,switch", "seed=0,1")
    assert "(4 reused)" in again[3], again[3]  # same spec -> same file, not made again
    assert sorted(Path(f).name for f in again[1][1:]) == cells


def test_grid_refuses_a_bad_axis_by_name(world):
    with pytest.raises(gradio_client.exceptions.AppError, match="(?i)axis"):
        grid(world["client"], "nonsense=1,2")


def test_reproduce_imports_an_a1111_png(world, tmp_path):
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a knight, <lora:tiny_style:0.6> castle\nNegative prompt: blurry\n"
                                "Steps: 7, Sampler: DDIM, CFG scale: 5.5, Seed: 1234, Size: 32x32, "
                                "Model hash: abcdef1234, Denoising strength: 0.4")
    png = tmp_path / "a1111.png"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(png, pnginfo=info)
    settings, note, text = world["client"].predict(handle_file(str(png)), api_name="/reproduce")
    assert settings["prompt"].startswith("a knight") and "<lora:" not in settings["prompt"]
    assert settings["negative_prompt"] == "blurry"
    assert (settings["steps"], settings["guidance_scale"], settings["seed"]) == (7, 5.5, 1234)
    assert (settings["height"], settings["width"], settings["scheduler"]) == (32, 32, "ddim")
    assert [(l["name"], l["weight"]) for l in settings["loras"]] == [("tiny_style", 0.6)]
    assert "imported the settings of" in note and "Denoising strength" in note  # what does not map is listed
    assert "Steps: 7" in text


def test_history_lists_the_output_folder_and_loads_settings(world):
    client = world["client"]
    client.predict("tiny:sd1", "a portrait", "", PAIR, "switch", {}, 2, 7.5, 32, 32, "ddim", 5, None, 0.0, 1,
                   api_name="/generate")
    gallery, table, status = client.predict(api_name="/history")
    names = [Path(g["image"]).name for g in gallery]
    assert "item(s) in the output folder" in status and len(gallery) == len(table["data"])
    assert names == [r[0] for r in table["data"]]
    made = next(n for n in names if n.startswith("switch_s5_"))
    caption = gallery[names.index(made)]["caption"]
    assert "switch" in caption and "seed 5" in caption and "tiny_character" in caption  # captioned
    settings, axes, note = client.predict(made, api_name="/history_settings")
    assert settings["method"] == "switch" and settings["seed"] == 5 and axes is None
    assert [l["name"] for l in settings["loras"]] == ["tiny_character", "tiny_style"]
    assert "loaded the settings of" in note
    # a grid of the history gives its axes back (the X/Y/Z tab is filled from them)
    grid(client, "method=merge,composite", seed=3)
    names = [r[0] for r in client.predict(api_name="/history")[1]["data"]]
    grid_name = next(n for n in names if n.startswith("grid_"))
    _, axes, _ = client.predict(grid_name, api_name="/history_settings")
    assert axes[0].startswith("method=") and "composite" in axes[0]


def test_history_refuses_a_file_outside_the_output_folder(world):
    with pytest.raises(gradio_client.exceptions.AppError):
        world["client"].predict("../loras/tiny_style.safetensors", api_name="/history_settings")


def test_score_gives_clipscore_per_image(world):
    client = world["client"]
    _, png, result, _, _ = client.predict("tiny:sd1", "a portrait", "", PAIR, "merge", {}, 2, 7.5, 32, 32, "ddim", 8,
                                          None, 0.0, 2, api_name="/generate")
    assert [Path(f).name.split("_")[1] for f in result["files"]] == ["s8", "s9"]  # batch count 2: seed, seed + 1
    clip_rows, _, status = client.predict([Path(f).name for f in result["files"]], False, api_name="/score")
    rows = clip_rows["data"]
    assert len(rows) == 2 and all(isinstance(r[3], float) for r in rows), rows
    assert "scored" in status


def test_seed_minus_one_draws_a_new_seed_each_image(world):
    from PIL import Image

    from loraloom.pipelines.spec import SPEC_CHUNK

    client = world["client"]
    result = client.predict("tiny:sd1", "a portrait", "", PAIR, "merge", {}, 2, 7.5, 32, 32, "ddim", -1, None, 0.0,
                            2, api_name="/generate")[2]
    seeds = result["seeds"]
    assert len(seeds) == 2 and all(s >= 0 for s in seeds) and seeds[0] != seeds[1]
    for f, seed in zip(result["files"], seeds):  # each PNG's spec records the seed drawn for it
        with Image.open(f) as im:
            assert json.loads(im.text[SPEC_CHUNK])["seed"] == seed


def test_api_clients_get_progress_but_no_preview_images(world):
    """gradio_client downloads every file of every update; /generate sends it the status per step and the image
    once, at the end (the page gets a preview per step)."""
    job = world["client"].submit("tiny:sd1", "a portrait", "", PAIR, "merge", {}, 6, 7.5, 32, 32, "ddim", 21, None,
                                 0.0, 1, api_name="/generate")
    preview, png, *_ = job.result()
    updates = job.outputs()[:-1]
    assert any("step" in str(u[-1]) for u in updates)  # progress came
    assert all(not isinstance(u[0], str) for u in updates)  # no preview image (a downloaded file) before the end
    assert preview and Path(preview).is_file() and Path(png).is_file()
