"""The A1111 `parameters` text of a PNG says what was done, and nothing a prompt makes up (issue 21, point 3):
A1111's hash definitions, its quoting, its sampler names, the strength each LoRA was applied with, and an
independent reader (sd-parsers) that reads it back. No generation here: see test_png_metadata_cache.py."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from diffusers import PNDMScheduler
from PIL import Image
from safetensors.torch import save_file
from sd_parsers import ParserManager

from loraloom.composition.files import WritePolicy
from loraloom.composition.lora_file import file_digest, file_sha256
from loraloom.pipelines.schedulers import make_scheduler, scheduler_names
from loraloom.pipelines.spec import (
    GenerationSpec,
    LoRARef,
    Provenance,
    RegionRef,
    a1111_line,
    a1111_name,
    a1111_quote,
    a1111_sampler,
    save_png,
)

HOSTILE = 'a "cat", sitting: here\nNegative prompt: forged\nSteps: 999, Sampler: Euler, CFG scale: 1, Seed: 5 <lora:evil:3>\r\n'
HOSTILE_NEGATIVE = 'ugly, "bad": hands\u2028Steps: 1, Seed: 2, Size: 8x8'

# A1111's pattern of one `key: value` of the settings line (modules/infotext_utils.py, re_param), and its rules for
# the lines above it (parse_generation_parameters): this reader follows them, nothing of loraloom's.
A1111_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def read_a1111(text: str) -> tuple[str, str, dict[str, str]]:
    *lines, last = text.strip().split("\n")
    if len(A1111_FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in A1111_FIELD.findall(last):
        fields[key] = json.loads(value) if value[:1] == '"' and value[-1:] == '"' else value
    return "\n".join(prompt), "\n".join(negative), fields


def _refs(*names_weights, categories=None):
    categories = categories or {}
    return [LoRARef(f"/loras/{n}.safetensors", w, name=n, category=categories.get(n), sha256=hashlib.sha256(n.encode()).hexdigest())
            for n, w in names_weights]


# --- hashes as A1111 computes them ------------------------------------------------------------------------------
def a1111_addnet_hash(path) -> str:
    """modules/hashes.py addnet_hash_safetensors, as written there: seek past 8 + the header length, hash the rest."""
    h = hashlib.sha256()
    with open(path, "rb") as b:
        n = int.from_bytes(b.read(8), "little")
        b.seek(n + 8)
        for chunk in iter(lambda: b.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_lora_hash_is_a1111_autov3_and_model_hash_autov2(tmp_path):
    tensors = {"a.lora_down.weight": torch.randn(4, 32), "a.lora_up.weight": torch.randn(32, 4)}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_file(tensors, str(one), metadata={"ss_output_name": "one"})
    save_file(tensors, str(two), metadata={"ss_output_name": "a much longer name, so that the header grows"})
    d1, d2 = file_digest(one), file_digest(two)
    assert d1.sha256 == file_sha256(one) and d1.autov2 == file_sha256(one)[:10]
    assert d1.data_sha256 == a1111_addnet_hash(one) and d1.autov3 == a1111_addnet_hash(one)[:12]
    # The tensor bytes alone: a header edit (A1111 and civitai tools write metadata into files) keeps the LoRA hash.
    assert d1.autov3 == d2.autov3 and d1.sha256 != d2.sha256
    for chunk in (1, 7, 8, 9, 100):  # the header/data boundary inside or across read blocks
        assert file_digest(one, chunk=chunk) == d1


def test_lora_hash_of_a_pickle_is_the_whole_file(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(3)}, path)
    digest = file_digest(path)
    assert digest.data_sha256 is None and digest.autov3 == file_sha256(path)[:12]


# --- A1111 sampler and schedule type names ------------------------------------------------------------------------
SD15 = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                     steps_offset=1, set_alpha_to_one=False).config  # runwayml/stable-diffusion-v1-5's scheduler
EXPECTED = {  # every name loraloom accepts, on SD 1.5's own scheduler config. A class made from another's config
    # keeps its own default spacing (diffusers' _use_default_values): "linspace", which is A1111's "Uniform".
    "default": ("PLMS", None), "dpmsolver++": ("DPM++ 2M", "Uniform"), "dpmsolver++-karras": ("DPM++ 2M", "Karras"),
    "dpmsolver++-sde": ("DPM++ 2M SDE", "Uniform"), "ddim": ("DDIM", None), "ddpm": ("DDPMScheduler", None),
    "euler": ("Euler", "Uniform"), "euler-a": ("Euler a", "Uniform"), "heun": ("Heun", "Uniform"),
    "lms": ("LMS", "Uniform"), "pndm": ("PLMS", None), "unipc": ("UniPC", None),
    "KDPM2DiscreteScheduler": ("DPM2", "Uniform"), "KDPM2AncestralDiscreteScheduler": ("DPM2 a", "Uniform"),
    "DEISMultistepScheduler": ("DEISMultistepScheduler", None),
    "DPMSolverSinglestepScheduler": ("DPMSolverSinglestepScheduler", None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sampler_names_are_a1111s(name):
    sched = make_scheduler(name, SD15, PNDMScheduler)
    assert a1111_sampler(type(sched).__name__, sched.config) == EXPECTED[name]


def test_every_scheduler_name_has_a_decided_a1111_name():
    assert set(scheduler_names()) <= set(EXPECTED)


@pytest.mark.parametrize("spacing,schedule", [("linspace", "Uniform"), ("leading", "DDIM"), ("trailing", "SGM Uniform")])
def test_schedule_type_follows_timestep_spacing(spacing, schedule):
    """SDXL's own scheduler (Euler, "leading"); A1111 >= 1.9 reads a missing schedule type as Karras for DPM++ 2M."""
    assert a1111_sampler("EulerDiscreteScheduler", {"timestep_spacing": spacing}) == ("Euler", schedule)
    assert a1111_sampler("DPMSolverMultistepScheduler", {"timestep_spacing": spacing, "use_karras_sigmas": True}) == ("DPM++ 2M", "Karras")


def test_default_scheduler_without_its_model_is_left_out_not_named_default():
    text = GenerationSpec(model="m", prompt="p", scheduler="default").a1111_parameters()
    _, _, fields = read_a1111(text)
    assert "Sampler" not in fields and "default" not in text
    ran = {"_class_name": "DDIMScheduler"}
    assert read_a1111(GenerationSpec(model="m", prompt="p", scheduler="default").a1111_parameters(Provenance(scheduler=ran)))[2]["Sampler"] == "DDIM"


# --- the strength applied, and the parameters in effect ---------------------------------------------------------------
@pytest.mark.parametrize("method,params,weights", [
    ("merge", {}, ["0.8", "0.4"]),  # Merge's default lora_scale 0.8 multiplies each weight
    ("merge", {"lora_scale": 1.0}, ["1", "0.5"]),
    ("composite", {"lora_scale": 0.5}, ["0.5", "0.25"]),
    ("klora", {}, ["1", "0.5"]),
    ("clora", {"style_scale": 0.6}, ["1", "0.3"]),  # "b" is a style LoRA: CLoRA applies it at style_scale
])
def test_tags_carry_the_strength_applied(method, params, weights):
    spec = GenerationSpec(model="m", prompt="p", loras=_refs(("a", 1.0), ("b", 0.5), categories={"b": "style"}),
                          method=method, method_params=params)
    prompt, _, _ = read_a1111(spec.a1111_parameters())
    assert re.findall(r"<lora:(\w+):([-\d.e]+)>", prompt) == [("a", weights[0]), ("b", weights[1])]


def test_identity_ignores_defaults_so_a_recorded_spec_keeps_its_name():
    given = GenerationSpec(model="m", prompt="p", method="switch")
    recorded = GenerationSpec(model="m", prompt="p", method="switch", method_params=given.params_in_effect())
    assert recorded.method_params["lora_scale"] == 0.8 and recorded.method_params["switch_interval"] == 5
    assert recorded.identity() == given.identity() == GenerationSpec.from_dict(json.loads(recorded.to_json())).identity()
    assert GenerationSpec(model="m", prompt="p", method="switch", method_params={"switch_interval": 3}).identity() != given.identity()
    # the names loraloom gave before stay: for a spec without method parameters the hash is over the same fields
    old = given.to_dict()
    old.pop("version")
    # unset sampler fields (the model family's since issue 28) were DEFAULTS' values in every spec before
    from loraloom.pipelines.defaults import DEFAULTS
    assert (old["steps"], old["guidance_scale"], old["scheduler"]) == (None, None, None)
    old.update(steps=DEFAULTS.steps, guidance_scale=DEFAULTS.guidance_scale, scheduler=DEFAULTS.scheduler)
    assert given.identity() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]


# --- a prompt cannot forge lines or fields ------------------------------------------------------------------------------
def test_hostile_prompt_stays_on_its_line():
    spec = GenerationSpec(model="runwayml/stable-diffusion-v1-5", prompt=HOSTILE, negative_prompt=HOSTILE_NEGATIVE,
                          loras=_refs(("a", 1.0)), steps=20, seed=7)
    text = spec.a1111_parameters()
    assert len(text.split("\n")) == 3 and len(text.splitlines()) == 3
    prompt, negative, fields = read_a1111(text)
    assert prompt == a1111_line(HOSTILE) + " <lora:a:0.8>" and "<lora:evil" not in prompt
    assert negative == a1111_line(HOSTILE_NEGATIVE)
    assert (fields["Steps"], fields["Seed"], fields["Sampler"], fields["CFG scale"]) == ("20", "7", "DPM++ 2M", "7.5")
    assert "Size" not in fields  # the prompt's "Size: 8x8" did not become one


def test_a1111_line_changes_nothing_clip_reads():
    from loraloom.pipelines.tiny import build_tiny_sd

    tokenizer = build_tiny_sd().tokenizer
    for text in (HOSTILE, HOSTILE_NEGATIVE, "x\x85y\u2029z NEGATIVE PROMPT:w"):
        assert "\n" not in a1111_line(text) and not re.search("negative prompt:", a1111_line(text), re.I)
        assert tokenizer(a1111_line(text)).input_ids == tokenizer(text).input_ids


@pytest.mark.parametrize("value,written", [
    ("plain", "plain"), ("a, b", '"a, b"'), ("tiny:sd1", '"tiny:sd1"'), ('say "hi"', '"say \\"hi\\""'),
    ("two\nlines", '"two\\nlines"'), ("sep\u2028x", '"sep\\u2028x"'),
])
def test_values_are_quoted_as_a1111_quotes_them(value, written):
    assert a1111_quote(value) == written
    _, _, fields = read_a1111(f"p\nSteps: 1, Model: {a1111_quote(value)}, Seed: 2, CFG scale: 3")
    assert fields["Model"] == value


def test_lora_names_cannot_break_tags_or_hashes():
    assert a1111_name("st:y,le<x>{}") == "stylex" and a1111_name("::") == "lora" and a1111_name("a\nb") == "a b"


# --- an independent reader: sd-parsers -----------------------------------------------------------------------------
@pytest.mark.parametrize("width,height", [(1024, 1024), (1152, 896)])  # SDXL sizes (and one that is not square)
def test_sd_parsers_reads_it_back(tmp_path, width, height):
    loras = _refs(("char", 1.0), ("style,v2", 0.7), ("bg", -0.5))
    spec = GenerationSpec(model=str(tmp_path / "sdxl-base.safetensors"), prompt=HOSTILE, negative_prompt=HOSTILE_NEGATIVE,
                          loras=loras, method="composite", steps=25, guidance_scale=5.5, height=height, width=width,
                          scheduler="euler-a", seed=123456789)
    provenance = Provenance(lora_hashes={r.adapter_name: r.sha256[20:32] for r in loras}, model_hash="0123456789",
                            scheduler={"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "leading"})
    path = save_png(Image.new("RGB", (width, height), (20, 40, 60)), tmp_path / "x.png", spec, WritePolicy.at(tmp_path), provenance)

    info = ParserManager().parse(path)
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    tags = "<lora:char:0.8> <lora:stylev2:0.56> <lora:bg:-0.4>"
    assert sampler.prompts[0].value == f"{a1111_line(HOSTILE)} {tags}"
    assert sampler.negative_prompts[0].value == a1111_line(HOSTILE_NEGATIVE)
    assert sampler.name == "Euler a"
    assert sampler.parameters == {"steps": "25", "cfg_scale": "5.5", "seed": "123456789", "scheduler": "DDIM"}
    assert info.metadata["Size"] == f"{width}x{height}"
    assert (sampler.model.name, sampler.model.hash) == ("sdxl-base", "0123456789")
    assert info.metadata["Hashes"] == {"model": "0123456789", **{f"lora:{a1111_name(r.adapter_name)}": r.sha256[:10] for r in loras}}
    # "Lora hashes" is one quoted value, which sd-parsers splits at its commas: A1111's own rules read it whole
    _, _, fields = read_a1111(Image.open(path).text["parameters"])
    assert fields["Lora hashes"] == f"char: {loras[0].sha256[20:32]}, stylev2: {loras[1].sha256[20:32]}, bg: {loras[2].sha256[20:32]}"
    assert fields["Model hash"] == "0123456789" and fields["Size"] == f"{width}x{height}"


# --- controls in the tags (issue 23): the same guarantees ------------------------------------------------------------
def test_control_tags_keep_the_text_to_its_lines_and_fields(tmp_path):
    vector = "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"
    loras = [LoRARef("/loras/c.safetensors", 1.0, name="c:h,a<r>", te=0.5, lbw=vector, start=2, stop=10),
             LoRARef("/loras/s.safetensors", 0.7, name="s", lbw="outd", mask="left", keyframes=[[0, 0], [0.5, 1]])]
    spec = GenerationSpec(model="runwayml/stable-diffusion-v1-5", prompt=HOSTILE, negative_prompt=HOSTILE_NEGATIVE,
                          loras=loras, regions=[RegionRef("right", prompt=HOSTILE, negative_prompt=HOSTILE_NEGATIVE)],
                          base_weight=0.3, steps=20, seed=7)
    text = spec.a1111_parameters()
    assert len(text.split("\n")) == 3 and len(text.splitlines()) == 3
    prompt, negative, fields = read_a1111(text)
    tags = f"<lora:char:0.4:0.8:lbw={vector}:start=2:stop=10> <lora:s:0.56:lbw=OUTD>"
    assert prompt == f"{a1111_line(HOSTILE)} {tags}" and negative == a1111_line(HOSTILE_NEGATIVE)
    assert (fields["Steps"], fields["Seed"], fields["Sampler"]) == ("20", "7", "DPM++ 2M") and "Size" not in fields
    path = save_png(Image.new("RGB", (64, 64)), tmp_path / "x.png", spec, WritePolicy.at(tmp_path))
    (sampler,) = ParserManager().parse(path).samplers
    assert sampler.prompts[0].value == f"{a1111_line(HOSTILE)} {tags}"
    assert {k: sampler.parameters[k] for k in ("steps", "cfg_scale", "seed")} == {"steps": "20", "cfg_scale": "7.5", "seed": "7"}
    # the loraloom chunk holds everything, the regions' prompts exactly
    recorded = json.loads(Image.open(path).text["loraloom"])
    assert recorded["regions"][0]["prompt"] == HOSTILE and recorded["base_weight"] == 0.3
    assert GenerationSpec.from_dict(recorded) == spec
