"""`loraloom eval DIR` end to end: specs read from PNGs, CLIPScore with a tiny CLIP, pairwise judge on a real
local HTTP server, files written next to the images, summaries printed, and a second run that sends nothing."""

import base64
import csv
import json

import pytest
from PIL import Image

from loraloom.app.cli import main
from loraloom.composition.files import WritePolicy
from loraloom.evaluation.fakes import FakeChatServer, brightness_judge, tiny_clip_folder
from loraloom.pipelines.spec import GenerationSpec, LoRARef, save_png

SHADE = {"merge": 120, "switch": 60, "composite": 200}  # the scripted judge prefers brighter images


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def folder(tmp_path):
    sets = [("a girl in a castle", [LoRARef("loras/girl.safetensors", 0.8, "girl", "character", ["girl", "red"]),
                                    LoRARef("loras/castle.safetensors", 0.8, "castle", "background", ["castle"])]),
            ("a dog, watercolor", [LoRARef("loras/dog.safetensors", 1.0, "dog", "object", ["dog"]),
                                   LoRARef("loras/wc.safetensors", 1.0, "wc", "style", ["watercolor style"])])]
    out = tmp_path / "gen"
    for prompt, loras in sets:
        for seed in (0, 1):
            for method, shade in SHADE.items():
                spec = GenerationSpec(model="tiny:sd1", prompt=prompt, loras=loras, method=method, seed=seed)
                save_png(Image.new("RGB", (32, 32), (shade, shade - seed * 10, 80)), out / spec.file_name(), spec, WritePolicy.at(out))
    Image.new("RGB", (8, 8)).save(out / "not_ours.png")
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_folder_clip_and_pairwise(folder, clip_dir, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeChatServer(brightness_judge) as server:
        argv = ["eval", str(folder), "--clip", str(clip_dir), "--device", "cpu", "--pairwise", "--judge", "openai",
                "--judge-model", "fake-vlm", "--base-url", server.url, "--timeout", "5"]
        assert main(argv + ["--workers", "3"]) == 0
        first = capsys.readouterr()
        assert len(server.requests) == 2 * 2 * 2 * 2  # sets × seeds × (switch, composite vs merge) × both orders
        sent = base64.b64decode(server.requests[0]["messages"][0]["content"][1]["image_url"]["url"].split(",")[1])
        assert b"loraloom" not in sent and b"castle" not in sent  # pixels only: the spec stays on this machine
        threaded = (folder / "loraloom_pairwise.csv").read_text()
        assert main(argv) == 0
        second = capsys.readouterr()
        assert len(server.requests) == 16  # the second run is answered from the cache

    rows = read_csv(folder / "loraloom_scores.csv")
    assert len(rows) == 12 and {r["method"] for r in rows} == set(SHADE)
    assert all(r["clip_score"] != "" and float(r["clip_score"]) >= 0 for r in rows)
    assert {r["clip_text"] for r in rows} == {"girl, red, castle", "dog, watercolor style"}
    records = [json.loads(l) for l in (folder / "loraloom_scores.jsonl").read_text().splitlines()]
    assert records[0]["spec"]["model"] == "tiny:sd1" and records[0]["clip"]["scale"] == 100.0

    assert (folder / "loraloom_pairwise.csv").read_text() == threaded  # same rows, same order, with or without workers
    pairs = read_csv(folder / "loraloom_pairwise.csv")
    assert len(pairs) == 8 and {p["method_b"] for p in pairs} == {"merge"}
    for p in pairs:
        assert p["composition_outcome"] == ("win" if p["method_a"] == "composite" else "lose")
        assert p["image_quality_outcome"] == "tie" and p["error"] == ""
    full = [json.loads(l) for l in (folder / "loraloom_pairwise.jsonl").read_text().splitlines()]
    assert all(len(r["result"]["orders"]) == 2 and r["result"]["orders"][0]["text"] for r in full)

    out = first.out
    assert "CLIPScore = 100·max(cos,0)" in out and "composite vs merge" in out and "switch vs merge" in out
    assert "4/0/0" in out and "0/0/4" in out and "0/4/0" in out  # composite wins, switch loses, quality ties
    assert "16 requests sent" in out and "skipped 1 PNG" in first.err
    assert "0 requests sent" in second.out and "16 from the cache" in second.out
    assert (folder / "loraloom_judge_cache.jsonl").exists()


def test_eval_prompt_text_scale_and_errors(folder, clip_dir, capsys, tmp_path):
    out_dir = tmp_path / "scores"
    assert main(["eval", str(folder), "--clip", str(clip_dir), "--device", "cpu", "--clip-text", "prompt",
                 "--clip-scale", "2.5", "--out", str(out_dir)]) == 0
    rows = read_csv(out_dir / "loraloom_scores.csv")
    assert {r["clip_text"] for r in rows} == {"a girl in a castle", "a dog, watercolor"}
    assert all(0 <= float(r["clip_score"]) <= 2.5 for r in rows) and rows[0]["clip_scale"] == "2.5"
    assert not (folder / "loraloom_scores.csv").exists()
    capsys.readouterr()
    assert main(["eval", str(folder), "--pairwise", "--no-clip"]) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing-here"), "--no-clip"]) == 2
    assert "not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty), "--no-clip"]) == 2
    assert "no loraloom PNGs" in capsys.readouterr().err


def error_line(err: str) -> str:
    """The one `loraloom: error: … Fix: …` line a failed command printed last, never a traceback."""
    assert "Traceback" not in err
    errors = [l for l in err.splitlines() if l.startswith("loraloom: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Fix: " in errors[0], err
    return errors[0]


def test_missing_folder_and_file_instead_of_folder(tmp_path, folder, capsys):
    assert main(["eval", str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here: not a folder: nothing of that name exists" in error_line(capsys.readouterr().err)
    png = next(folder.glob("merge_*.png"))
    assert main(["eval", str(png)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "it is a file" in line and f"Fix: pass the folder that holds the PNGs ({folder})" in line
    out_file = tmp_path / "scores.txt"
    out_file.write_text("")
    assert main(["eval", str(folder), "--no-clip", "--out", str(out_file)]) == 2
    assert "--out" in error_line(capsys.readouterr().err)


def test_unreadable_png_is_named_before_any_model_loads(folder, capsys):
    from loraloom.pipelines.spec import read_png_spec

    broken = sorted(folder.glob("switch_*.png"))[:2]
    data = broken[0].read_bytes()
    broken[0].write_bytes(data[:data.index(b"IDAT") + 12])  # cut inside the pixels: its spec (before them) still reads
    assert read_png_spec(broken[0]).method == "switch"
    broken[1].write_bytes(broken[1].read_bytes()[:30])  # cut inside the header
    # no --clip: the default CLIP is not cached here, so reaching the model would be a different error
    assert main(["eval", str(folder), "--device", "cpu"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"loraloom: error: 2 PNG(s) in {folder} cannot be read: ")
    assert all(p.name in line for p in broken) and "Fix: regenerate or remove them" in line
    assert not (folder / "loraloom_scores.csv").exists()


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://example.org/v1", "http://", "http://[::1", "http://exa mple.org/v1"])
def test_bad_judge_url_is_one_line(folder, url, capsys):
    argv = ["eval", str(folder), "--no-clip", "--pairwise", "--judge", "openai", "--judge-model", "m", "--base-url", url]
    assert main(argv) == 2
    line = error_line(capsys.readouterr().err)
    assert repr(url) in line and "Fix: pass --base-url like" in line
    assert not (folder / "loraloom_pairwise.csv").exists()


def test_judge_url_checked_by_the_library_too():
    from loraloom.evaluation.errors import EvaluationError
    from loraloom.evaluation.judges.openai_chat import OpenAIChatJudge

    with pytest.raises(EvaluationError, match="not an http"):
        OpenAIChatJudge("m", base_url="api.openai.com/v1")


def test_method_label_ignores_parameters_at_their_defaults():
    """A PNG records every parameter in effect; its label is still the plain method name (the eval baseline)."""
    from loraloom.composition.methods import make_method, params_to_dict
    from loraloom.evaluation.scoring import method_label

    full = params_to_dict(make_method("merge").params)
    assert method_label(GenerationSpec(model="tiny:sd1", prompt="p", method="merge", method_params=full)) == "merge"
    changed = GenerationSpec(model="tiny:sd1", prompt="p", method="switch", method_params={**params_to_dict(make_method("switch").params), "switch_interval": 3})
    assert method_label(changed) == "switch(switch_interval=3)"
