"""The web UI's parts without a server: path policy, upload checks, method controls generated from parameter
dataclasses, trigger insertion, stopping a streamed generation, and the `loraloom ui` command line."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from PIL import Image

from loraloom.app.ui.paths import PathRefused, resolve_inside
from loraloom.app.ui.uploads import UploadRefused, check_lora_upload, check_png_upload, safe_file_name
from loraloom.composition.errors import LoraloomError
from loraloom.composition.methods import REGISTRY, Method, register
from loraloom.composition.methods.base import param

pytestmark = pytest.mark.usefixtures("one_thread_module")


# --- paths ------------------------------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
    root, other = tmp_path / "loras", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    (root / "a.safetensors").write_bytes(b"x")
    (root / "sub" / "b.safetensors").write_bytes(b"x")
    (other / "secret.safetensors").write_bytes(b"x")
    (root / "link.safetensors").symlink_to(other / "secret.safetensors")
    (root / "linkdir").symlink_to(other, target_is_directory=True)
    (root / "inner_link.safetensors").symlink_to(root / "sub" / "b.safetensors")
    return root, other


def test_paths_inside_the_roots_resolve(tree):
    root, _ = tree
    assert resolve_inside("a.safetensors", [root]) == (root / "a.safetensors").resolve()
    assert resolve_inside("sub/b.safetensors", [root]) == (root / "sub" / "b.safetensors").resolve()
    assert resolve_inside(str(root / "a.safetensors"), [root]) == (root / "a.safetensors").resolve()
    assert resolve_inside("inner_link.safetensors", [root]) == (root / "sub" / "b.safetensors").resolve()


@pytest.mark.parametrize("path, message", [
    ("../other/secret.safetensors", "'..' is not allowed"),
    ("sub/../a.safetensors", "'..' is not allowed"),
    ("/etc/passwd", "outside the allowed folders"),
    ("link.safetensors", "symlink"),
    ("linkdir/secret.safetensors", "symlink"),
    ("", "no file path"),
])
def test_paths_outside_the_roots_are_refused(tree, path, message):
    root, other = tree
    with pytest.raises(PathRefused, match=message):
        resolve_inside(path, [root])
    with pytest.raises(PathRefused):
        resolve_inside(str(other / "secret.safetensors"), [root])


# --- uploads ----------------------------------------------------------------------------------------------------
def test_png_upload_checks(tmp_path):
    good = tmp_path / "ok.png"
    Image.new("RGB", (16, 16)).save(good)
    assert check_png_upload(good, 10_000) == good
    with pytest.raises(UploadRefused, match="limit"):
        check_png_upload(good, 10)
    jpg = tmp_path / "photo.jpg"
    Image.new("RGB", (16, 16)).save(jpg)
    with pytest.raises(UploadRefused, match=r"not a \.png"):
        check_png_upload(jpg, 10_000)
    disguised = tmp_path / "disguised.png"
    disguised.write_bytes(jpg.read_bytes())
    with pytest.raises(UploadRefused, match="not a PNG"):
        check_png_upload(disguised, 10_000)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UploadRefused, match="empty"):
        check_png_upload(empty, 10_000)


def test_png_upload_refuses_huge_pixel_counts(tmp_path, monkeypatch):
    import loraloom.app.ui.uploads as uploads

    big = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(big)
    monkeypatch.setattr(uploads, "MAX_PNG_PIXELS", 1000)
    with pytest.raises(UploadRefused, match="pixels"):
        check_png_upload(big, 10_000_000)


def test_lora_upload_checks(tmp_path):
    from loraloom.app.ui.sandbox import EXAMPLE_LORAS

    good = EXAMPLE_LORAS / "tiny_style.safetensors"
    assert check_lora_upload(good, 10**8) == good
    with pytest.raises(UploadRefused, match="limit"):
        check_lora_upload(good, 100)
    pickle = tmp_path / "x.ckpt"
    pickle.write_bytes(b"x" * 10)
    with pytest.raises(UploadRefused, match="safetensors"):
        check_lora_upload(pickle, 10**8)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 100)
    with pytest.raises(UploadRefused, match="not a usable LoRA"):
        check_lora_upload(junk, 10**8)
    assert safe_file_name("../../etc/my style?.safetensors", ".safetensors") == "my_style.safetensors"
    assert safe_file_name("...", ".png") == "upload.png"


# --- method controls from the parameter dataclass ---------------------------------------------------------------
@dataclass
class ProbeParams:
    strength: float = param(0.5, "How strong.", min=0.0, max=1.0)
    rounds: int = param(3, "How many rounds.", min=1)
    mode: str = param("a", "Which mode.", choices=["a", "b"])
    enabled: bool = param(True, "On or off.")
    limit: int | None = param(None, "Optional limit; empty = none.")
    label: str = param("x", "Free text.")
    weights: list = param([1.0, 2.0], "A list, as JSON.")
    save_to: str = param("", "Also write something to this file.")


class Probe(Method):
    name = "ui_probe"
    Params = ProbeParams


@pytest.fixture
def probe_method():
    register(Probe)
    try:
        yield Probe
    finally:
        REGISTRY.pop(Probe.name, None)


def test_fields_follow_the_dataclass(probe_method):
    from loraloom.app.ui.params import collect, control_values, method_fields

    fields = method_fields("ui_probe")
    assert [(f.name, f.kind) for f in fields] == [("strength", "float"), ("rounds", "int"), ("mode", "choice"),
                                                  ("enabled", "bool"), ("limit", "int"), ("label", "str"),
                                                  ("weights", "json"), ("save_to", "str")]
    assert [f.name for f in fields if f.path] == ["save_to"]
    assert fields[0].help == "How strong." and fields[0].maximum == 1.0 and fields[4].optional
    raws = control_values(fields, {})
    assert collect(fields, raws) == {"ui_probe": {"strength": 0.5, "rounds": 3, "mode": "a", "enabled": True,
                                                  "limit": None, "label": "x", "weights": [1.0, 2.0], "save_to": ""}}
    raws = control_values(fields, {"ui_probe": {"rounds": 7, "weights": [3]}})
    assert collect(fields, raws)["ui_probe"]["rounds"] == 7 and collect(fields, raws)["ui_probe"]["weights"] == [3]
    with pytest.raises(ValueError, match="ui_probe.rounds must be a whole number"):
        collect(fields, [0.5, 2.5, "a", True, None, "x", "[]", ""])
    with pytest.raises(ValueError, match="ui_probe.strength must lie in"):
        collect(fields, [1.5, 2, "a", True, None, "x", "[]", ""])
    with pytest.raises(ValueError, match="ui_probe.weights is not valid JSON"):
        collect(fields, [0.5, 2, "a", True, None, "x", "[1,", ""])


@pytest.fixture(scope="module")
def tiny_service(tmp_path_factory):
    """One service (one tiny model in memory) for the tests below."""
    from loraloom.app.ui.sandbox import tiny_ui_world
    from loraloom.app.ui.service import GenerationService

    return GenerationService(tiny_ui_world(tmp_path_factory.mktemp("ui-parts"), clip=False, hazards=False))


def test_a_newly_registered_method_gets_controls_in_the_page(probe_method, tiny_service):
    from loraloom.app.ui.app import build_app

    demo = build_app(tiny_service.config, tiny_service)
    comps = {c["props"].get("elem_id"): c for c in demo.config["components"] if c["props"].get("elem_id")}
    # a bounded number is a number box (issue 22: a slider clamps a typed value silently; the range is checked by
    # name when the form is read, test_fields_follow_the_dataclass)
    expected = {"strength": "number", "rounds": "number", "mode": "dropdown", "enabled": "checkbox", "limit": "number",
                "label": "textbox", "weights": "textbox"}
    for name, kind in expected.items():
        comp = comps[f"param-ui_probe-{name}"]
        assert comp["type"] == kind
        assert comp["props"]["info"]  # the dataclass help text
    assert comps["param-ui_probe-strength"]["props"]["value"] == 0.5
    method = comps["method"]["props"]
    assert "ui_probe" in [c[0] if isinstance(c, (list, tuple)) else c for c in method["choices"]]


def test_file_parameters_of_methods_stay_inside_the_folders(probe_method, tiny_service):
    from loraloom.app.ui.paths import PathRefused

    def spec(save_to):
        return tiny_service.make_spec("tiny:sd1", "p", "", [["tiny_character", 1.0]], "ui_probe", {"save_to": save_to},
                                      2, 7.5, 32, 32, "ddim", 0)

    out = tiny_service.config.output_dir
    assert spec("merged.safetensors").method_params["save_to"] == str(out / "merged.safetensors")
    assert spec("").method_params["save_to"] == ""  # "no file" passes as it is
    for bad in ("/etc/cron.d/x", "../x.safetensors", "~/.ssh/authorized_keys"):
        with pytest.raises(PathRefused, match="ui_probe.save_to"):
            spec(bad)


def test_model_folders_sizes_from_configs_and_refusals(tiny_service, tmp_path):
    from loraloom.app.ui.config import UIConfig
    from loraloom.app.ui.paths import PathRefused
    from loraloom.app.ui.service import GenerationService

    models = tmp_path / "models"
    tiny_service.pipeline("tiny:sd1").pipe.save_pretrained(models / "tiny-folder")
    (tmp_path / "elsewhere").mkdir()
    service = GenerationService(UIConfig(models=["tiny:sd1"], model_dirs=[models], lora_dirs=tiny_service.config.lora_dirs,
                                         output_dir=tmp_path / "out"))
    folder = str((models / "tiny-folder").resolve())
    assert service.model_choices() == ["tiny:sd1", folder]
    assert service.geometry(folder, load=False) == tiny_service.geometry("tiny:sd1")  # read from the configs
    assert service.cache.pipeline is None  # ... without loading anything
    assert service.resolve_model(folder) == folder
    for bad in (str(tmp_path / "elsewhere"), "../elsewhere"):
        with pytest.raises(PathRefused):
            service.resolve_model(bad)
    with pytest.raises(LoraloomError, match="nothing there"):
        service.resolve_model("runwayml/stable-diffusion-v1-5")  # not configured: never fetched from the hub


def test_insert_triggers():
    from loraloom.app.ui.app import insert_triggers

    assert insert_triggers("a portrait", ["ohwx", "ink wash"]) == "a portrait, ohwx, ink wash"
    assert insert_triggers("a portrait, ohwx", ["ohwx", "ink wash"]) == "a portrait, ohwx, ink wash"
    assert insert_triggers("{triggers}, portrait", ["ohwx", "ink"]) == "ohwx, ink, portrait"
    assert insert_triggers("", ["ohwx"]) == "ohwx"


# --- streaming and stopping -------------------------------------------------------------------------------------
def test_closing_a_stream_stops_the_run_and_saves_nothing(tiny_service):
    from loraloom.app.ui.streaming import StepEvent, stream_generation

    service, cfg = tiny_service, tiny_service.config
    spec = service.make_spec("tiny:sd1", "p", "", [["tiny_character", 1.0]], "merge", {}, 200, 7.5, 32, 32, "ddim", 0)
    stream = stream_generation(service, spec, preview_every=1)
    first = next(stream)
    assert isinstance(first, StepEvent) and first.step == 1 and first.total == 200 and first.preview.size == (32, 32)
    stream.close()  # what happens when the user presses Stop or goes away
    assert not service.lock.locked()
    assert not list(cfg.output_dir.glob("*_s0_*.png"))
    # the model is free and whole: a short run completes and is saved
    spec2 = service.make_spec("tiny:sd1", "p", "", [["tiny_character", 1.0]], "merge", {}, 2, 7.5, 32, 32, "ddim", 0)
    events = list(stream_generation(service, spec2, preview_every=0))
    assert [type(e).__name__ for e in events] == ["StepEvent", "StepEvent", "GenerationResult"]
    assert events[-1].path.exists()
    # a fast model is not slowed by its own progress reports: at most one event per min_interval, the last always
    spec4 = service.make_spec("tiny:sd1", "p", "", [["tiny_character", 1.0]], "merge", {}, 4, 7.5, 32, 32, "ddim", 1)
    events = list(stream_generation(service, spec4, preview_every=1, min_interval=3600))
    assert [e.step for e in events[:-1]] == [1, 4] and all(e.preview is not None for e in events[:-1])


# --- command line -----------------------------------------------------------------------------------------------
def test_cli_defaults_are_safe_and_flags_reach_launch(monkeypatch, tmp_path):
    import loraloom.app.ui.app as ui_app
    from loraloom.app.cli import build_parser, main
    from loraloom.app.ui.sandbox import EXAMPLE_LORAS

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1" and not args.share and args.auth is None or args.auth  # env may set auth
    seen = {}
    demo = SimpleNamespace(service=SimpleNamespace(pipeline=lambda model: seen.setdefault("preloaded", model)))
    monkeypatch.setattr(ui_app, "build_app", lambda cfg: seen.setdefault("config", cfg) and demo)
    monkeypatch.setattr(ui_app, "launch", lambda demo, cfg, **kw: seen.update(kw))
    monkeypatch.delenv("LORALOOM_UI_AUTH", raising=False)
    rc = main(["ui", "--model", "tiny:sd1", "--lora-dir", str(EXAMPLE_LORAS), "--output-dir", str(tmp_path / "o"),
               "--auth", "ann:secret", "--port", "0", "--no-lora-upload"])
    assert rc == 0
    assert seen["host"] == "127.0.0.1" and seen["share"] is False and seen["auth"] == ("ann", "secret")
    assert seen["port"] is None
    cfg = seen["config"]
    assert cfg.models == ["tiny:sd1"] and cfg.lora_dirs == [EXAMPLE_LORAS] and not cfg.allow_lora_upload
    with pytest.raises(SystemExit):
        main(["ui", "--auth", "no-colon"])
    assert main(["ui", "--lora-dir", str(tmp_path / "missing")]) == 2  # a clear error, not a traceback


def test_default_threads_leave_a_core_to_the_server():
    from loraloom.app.ui.config import default_threads

    assert default_threads(2, 2) == 1  # this machine: 1 measured faster than torch's 2 (docs/ui.md, Speed)
    assert default_threads(1, 1) == 1 and default_threads(16, 8) == 8 and default_threads(16, 16) == 15


def test_judge_flags_reach_the_config(monkeypatch, tmp_path):
    import loraloom.app.ui.app as ui_app
    from loraloom.app.cli import main
    from loraloom.app.ui.sandbox import EXAMPLE_LORAS

    seen = {}
    demo = SimpleNamespace(service=SimpleNamespace(pipeline=lambda model: None))
    monkeypatch.setattr(ui_app, "build_app", lambda cfg: seen.setdefault("config", cfg) and demo)
    monkeypatch.setattr(ui_app, "launch", lambda demo, cfg, **kw: None)
    base = ["ui", "--model", "tiny:sd1", "--lora-dir", str(EXAMPLE_LORAS), "--output-dir", str(tmp_path / "o")]
    assert main([*base, "--judge", "openai", "--judge-model", "gpt-x", "--judge-base-url", "http://127.0.0.1:9/v1",
                 "--judge-api-key-env", "MY_KEY"]) == 0
    assert seen["config"].judge == {"kind": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1",
                                    "api_key_env": "MY_KEY"}
    with pytest.raises(SystemExit, match="--judge-model"):
        main([*base, "--judge", "openai"])


@pytest.mark.parametrize("method, name", [("ziplora", "save_merged"), ("ziplora", "coefficients"), ("hypernet", "checkpoint"),
                                          ("clora", "mask_dir"), ("cmlora", "profile_cache")])
def test_shipped_methods_mark_their_file_parameters(method, name):
    """The methods say which parameters name files (`param(..., path=...)`), so the UI checks them without guessing."""
    from loraloom.app.ui.params import method_fields
    from loraloom.composition.methods import describe_params, get_method

    assert next(d for d in describe_params(get_method(method)) if d["name"] == name)["path"] in ("file", "dir")
    assert next(f for f in method_fields(method) if f.name == name).path
    assert not any(f.path for f in method_fields(method) if f.name in ("lora_scale", "roles", "scope", "kv_merge"))
