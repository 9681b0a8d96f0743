"""Benchmark manifests: the shipped ComposLoRA manifest (counts, order, settings), the reader's checks, the
up-front missing-file report, method variants and seeds. No image is generated here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from loraloom.app.cli import main
from loraloom.composition.errors import SpecError
from loraloom.evaluation.bench.composlora import build_manifest
from loraloom.evaluation.bench.manifest import load_manifest, missing_files
from loraloom.evaluation.bench.plan import (
    build_plan,
    derived_seed,
    parse_methods,
    reference_generator,
    scheduler_draws_noise,
    shard,
)

ROOT = Path(__file__).resolve().parents[1]
COMPOSLORA = ROOT / "assets" / "composlora" / "manifest.yaml"
REFERENCE = Path(__file__).resolve().parent / "data" / "composlora" / "reference_sets.json"


def _git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints: pins a file to the exact bytes a git repository holds."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lora_infos(manifest: dict) -> dict[str, bytes]:
    """The reference repository's `<style>_lora_info.json` files, byte for byte, rebuilt from the shipped manifest's
    `loras` (the manifest carries every field of them, in their order; the files are 4-space-indented JSON)."""
    infos: dict[str, dict] = {}
    for lora in manifest["loras"]:
        style, lora_id = lora["id"].split("/", 1)
        entry = {"id": lora_id, "name": lora["name"], "trigger": lora["triggers"], "url": lora["url"]}
        infos.setdefault(style, {}).setdefault(lora["category"], []).append(entry)
    return {style: json.dumps(info, indent=4).encode() for style, info in infos.items()}


def _reference_sets(triggers: dict[tuple[str, str], list[str]]) -> bytes:
    """`composlora_sets_derived.json` (the reference enumeration with its prompts), byte for byte, from the compact
    copy in tests/data and the trigger words, by the rule its `_note` states."""
    compact = json.loads(REFERENCE.read_text(encoding="utf-8"))
    sets = []
    for style, n, run_index, lora_ids in compact["sets"]:
        clip_text = ", ".join(t for i in lora_ids for t in triggers[style, i])
        sets.append({"style": style, "n": n, "run_index": run_index, "lora_ids": lora_ids,
                     "prompt": f"{compact['base_prompt'][style]}, {clip_text}", "clip_text": clip_text})
    full = {"_note": compact["_note"], "base_prompt": compact["base_prompt"], "sets": sets}
    return json.dumps(full, indent=1).encode()


@pytest.fixture(scope="module")
def composlora():
    return load_manifest(COMPOSLORA)


def test_composlora_counts_order_and_settings(composlora):
    m = composlora
    assert len(m.loras) == 22 and len(m.sets) == 480
    assert m.counts() == {(g, n): c for g in ("anime", "reality") for n, c in ((2, 24), (3, 72), (4, 96), (5, 48))}
    # reference order: anime then reality; within a style n = 2..5; within a run the enumeration order
    keys = [(s.group, s.n) for s in m.sets]
    assert keys == sorted(keys, key=lambda k: (("anime", "reality").index(k[0]), k[1]))
    for s in m.sets:
        assert m.loras[s.lora_ids[0]].category == "character"
        cats = [m.loras[i].category for i in s.lora_ids]
        assert len(set(cats)) == len(cats)
        assert cats == sorted(cats, key=["character", "clothing", "style", "background", "object"].index)
        assert s.id == f"{s.group}-n{s.n}-{s.run_position:03d}"
    first = m.sets[0]
    assert first.lora_ids == ["anime/character_1", "anime/clothing_1"]
    assert m.sets[24].lora_ids == ["anime/character_1", "anime/clothing_1", "anime/style_1"]  # n=3 starts with (clothing, style)
    assert m.sets[-1].lora_ids == ["reality/character_3", "reality/clothing_2", "reality/style_2", "reality/background_2", "reality/object_2"]
    assert m.prompt(first) == "masterpiece, best quality, kamado nezuko, black hair, pink eyes, forehead, gmuniform, blue thighhighs, long sleeves"
    assert m.scoring_text(first) == "kamado nezuko, black hair, pink eyes, forehead, gmuniform, blue thighhighs, long sleeves"
    a, r = m.settings(first), m.settings(m.sets[-1])
    assert (a.height, a.width, a.guidance_scale, a.steps) == (512, 512, 10, 200)
    assert (r.height, r.width, r.guidance_scale, r.steps) == (1024, 768, 7, 100)
    for st in (a, r):
        assert st.scheduler == "dpmsolver++" and st.lora_scale == 0.8 and st.seeds == (111,)
    assert a.negative_prompt.startswith("EasyNegative,") and r.negative_prompt.startswith("extra heads, nsfw")
    assert m.base_models["reality"].vae == "stabilityai/sd-vae-ft-mse"
    assert m.model_ref("anime") == "gsdf/Counterfeit-V2.5"  # a hub id stays a hub id


def test_composlora_matches_reference_enumeration(composlora):
    """Against the reference data (no download, no skip): the LoRA metadata files and the derived enumeration are
    rebuilt here and must be the exact bytes the reference repository and the project's derivation hold (git blob
    ids in tests/data/composlora/reference_sets.json), then the same checks as against the original files."""
    shipped = yaml.safe_load(COMPOSLORA.read_text())
    pins = json.loads(REFERENCE.read_text(encoding="utf-8"))
    raw_infos = _lora_infos(shipped)
    assert {style: _git_blob_id(raw) for style, raw in raw_infos.items()} == pins["lora_info_blobs"], \
        "the manifest's loras no longer carry the reference *_lora_info.json files (Multi-LoRA-Composition @ cac122a)"
    infos = {style: json.loads(raw) for style, raw in raw_infos.items()}
    triggers = {(style, e["id"]): e["trigger"] for style, info in infos.items() for entries in info.values() for e in entries}
    raw_ref = _reference_sets(triggers)
    assert _git_blob_id(raw_ref) == pins["derived_blob"], "tests/data/composlora/reference_sets.json was changed"

    ref = json.loads(raw_ref)["sets"]
    assert len(ref) == len(composlora.sets)
    for s, r in zip(composlora.sets, ref):
        assert (s.group, s.n, s.run_position) == (r["style"], r["n"], r["run_index"])
        assert [i.split("/", 1)[1] for i in s.lora_ids] == r["lora_ids"]
        assert composlora.prompt(s) == r["prompt"]
        assert composlora.scoring_text(s) == r["clip_text"]
    # the shipped file is what the builder makes from the reference metadata
    built = build_manifest(infos)
    assert built == shipped


def test_missing_lora_files_listed_before_anything_loads(tmp_path, capsys):
    empty = tmp_path / "loras"
    empty.mkdir()
    rc = main(["bench", "run", str(COMPOSLORA), "--out", str(tmp_path / "out"), "--lora-dir", str(empty), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "22 LoRA file(s)" in err and "reality/object_2" in err and "ComposLoRA.zip" in err
    assert str(empty / "anime" / "character_1.safetensors") in err
    assert not (tmp_path / "out").exists()  # nothing was created, no model loaded
    rc = main(["bench", "run", str(COMPOSLORA), "--out", str(tmp_path / "out"), "--lora-dir", str(empty), "--limit", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "3 LoRA file(s)" in err and "anime/clothing_2" in err and "anime/style_1" not in err


def test_missing_files_partial(tmp_path, composlora):
    (tmp_path / "anime").mkdir()
    for name in ("character_1", "clothing_1"):
        (tmp_path / "anime" / f"{name}.safetensors").write_bytes(b"x")
    assert not missing_files(composlora, composlora.sets[:1], tmp_path)
    missing = missing_files(composlora, composlora.sets[:2], tmp_path)
    assert [lid for lid, _ in missing.loras] == ["anime/clothing_2"]


def _write(tmp_path, data) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _toy_format() -> dict:
    """The toy world's manifest format, as its issue specifies it."""
    return {
        "format": "loraloom-benchmark/1", "name": "toyworld", "description": "x", "checker": "checker", "clip": "clip",
        "base_models": {"toyworld": {"model": "model"}},
        "defaults": {"base_model": "toyworld", "steps": 25, "guidance_scale": 4.0, "scheduler": "default", "height": 32,
                     "width": 32, "lora_scale": 1.0, "negative_prompt": "", "seeds": [0, 1, 2, 3]},
        "loras": [{"id": "character_1", "name": "Stellu", "category": "character", "triggers": ["stellu"],
                   "file": "loras/character_1.safetensors", "concept": {"shape": "star"}},
                  {"id": "clothing_1", "name": "hat", "category": "clothing", "triggers": ["topha"],
                   "file": "loras/clothing_1.safetensors", "concept": {"clothing": "hat"}}],
        "sets": [{"id": "n2-000", "loras": ["character_1", "clothing_1"], "prompt": "a red stellu, topha",
                  "scoring_text": "stellu, topha", "expected": {"colour": "red", "shape": "star", "clothing": "hat"}}],
    }


def test_toy_world_format_and_layering(tmp_path):
    data = _toy_format()
    data["base_models"]["other"] = {"model": "tiny:sd1", "steps": 7, "guidance_scale": 2.0}
    data["sets"].append({"id": "n2-001", "base_model": "other", "loras": ["character_1", {"id": "clothing_1", "weight": 0.5}],
                         "guidance_scale": 3.0})
    m = load_manifest(_write(tmp_path, data))
    s0, s1 = m.sets
    assert m.prompt(s0) == "a red stellu, topha" and m.scoring_text(s0) == "stellu, topha"
    assert s0.expected == {"colour": "red", "shape": "star", "clothing": "hat"}
    assert m.checker == (tmp_path / "checker").resolve() and m.clip == "clip"
    assert m.model_ref("toyworld") == str((tmp_path / "model").resolve())
    st0, st1 = m.settings(s0), m.settings(s1)
    assert (st0.steps, st0.guidance_scale, st0.seeds) == (25, 4.0, (0, 1, 2, 3))
    assert (st1.steps, st1.guidance_scale, st1.height) == (7, 3.0, 32)  # set > base model > defaults
    assert s1.loras == (("character_1", 1.0), ("clothing_1", 0.5))
    assert m.prompt(s1) == "stellu, topha"  # default prompt: the trigger words
    assert m.loras["character_1"].concept == {"shape": "star"}


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(format="loraloom-benchmark/9"), "format"),
    (lambda d: d.update(colour="red"), r"top level: unknown key\(s\) \['colour'\]"),
    (lambda d: d["defaults"].update(stepz=3), r"defaults: unknown key"),
    (lambda d: d["sets"][0].update(loras=["character_1", "nope"]), r"sets\[0\] \(n2-000\)\.loras: unknown LoRA id 'nope'"),
    (lambda d: d["sets"].append(dict(d["sets"][0])), "is used twice"),
    (lambda d: d["defaults"].update(seeds=[1, 1]), "lists a seed twice"),
    (lambda d: d["defaults"].update(steps=0), r"defaults\.steps: must be a positive integer"),
    (lambda d: d["loras"][0].update(category="hat"), "is not one of"),
    (lambda d: d["loras"][0].update(triggers="stellu"), "must be a list of strings"),
    (lambda d: d["sets"][0].update(base_model="nope"), "is not in base_models"),
    (lambda d: d["sets"][0].update(id="a/b"), "path separators"),
])
def test_manifest_errors_name_the_key(tmp_path, change, match):
    data = _toy_format()
    change(data)
    with pytest.raises(SpecError, match=match):
        load_manifest(_write(tmp_path, data))


def test_parse_methods():
    v = parse_methods("merge, switch(switch_interval=3,order=given),composite")
    assert [x.label for x in v] == ["merge", 'switch(order="given",switch_interval=3)', "composite"]
    assert dict(v[1].params) == {"switch_interval": 3, "order": "given"}
    assert all(x.has_lora_scale for x in v)
    for bad, match in (("nonsense", "unknown method"), ("switch(tau=2)", "no parameter"), ("merge,merge", "twice"),
                       ("switch(3)", "key=value"), ("", "empty")):
        with pytest.raises((SpecError, ValueError), match=match):
            parse_methods(bad)


def test_seeds_are_a_pure_function_of_set_and_seed(tmp_path):
    m = load_manifest(_write(tmp_path, _toy_format()))
    expected = int.from_bytes(hashlib.sha256(b"n2-000:3").digest()[:4], "big") & 0x7FFFFFFF
    assert derived_seed("n2-000", 3) == expected
    variants = parse_methods("merge,composite")
    full = build_plan(m, m.sets, variants, hashes=lambda p: None)
    assert len(full) == 1 * 2 * 4
    assert [it.seed for it in full if it.variant.name == "merge"] == [derived_seed("n2-000", s) for s in (0, 1, 2, 3)]
    # the same seeds whatever the methods, their order, or how many seeds run
    few = build_plan(m, m.sets, parse_methods("composite"), seeds=2, hashes=lambda p: None)
    assert [it.seed for it in few] == [derived_seed("n2-000", s) for s in (0, 1)]
    assert {it.item_id: it.fingerprint for it in few}.items() <= {it.item_id: it.fingerprint for it in full}.items()
    plain = build_plan(m, m.sets, variants, overrides={"seeding": "plain"}, hashes=lambda p: None)
    assert [it.seed for it in plain][:4] == [0, 1, 2, 3]
    with pytest.raises(SpecError, match="only 4 seed"):
        build_plan(m, m.sets, variants, seeds=5, hashes=lambda p: None)


def test_reference_plan_positions_and_sharding(composlora):
    sets = composlora.select(patterns=["anime-n3-*"])
    plan = build_plan(composlora, sets, parse_methods("merge,switch"), reference_seeding=True, hashes=lambda p: None)
    assert [it.reference_position for it in plan if it.variant.name == "merge"] == list(range(72))
    assert {it.seed for it in plan} == {111}
    assert {it.run_key for it in plan} == {"anime/n3/merge/s111", "anime/n3/switch/s111"}
    shards = [shard(plan, i, 3) for i in range(3)]
    assert sorted(it.item_id for s in shards for it in s) == sorted(it.item_id for it in plan)
    assert shards[1][0] is plan[1] and shards[1][1] is plan[4]


def test_reference_generator_fast_forwards_the_run_stream():
    shape = (1, 4, 8, 8)
    g = torch.Generator("cpu").manual_seed(111)
    stream = [torch.randn(shape, generator=g) for _ in range(4)]
    for p in range(4):
        assert torch.equal(torch.randn(shape, generator=reference_generator(111, p, shape)), stream[p])


def test_scheduler_draws_noise():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    assert not scheduler_draws_noise(DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"))
    assert not scheduler_draws_noise(DDIMScheduler())
    assert scheduler_draws_noise(EulerAncestralDiscreteScheduler())
    assert scheduler_draws_noise(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))


def test_the_toy_world_writer_and_this_reader_agree(tmp_path):
    """`evaluation.toyworld.manifest` writes assets/toyworld/benchmark.yaml; this reader must take it as it is."""
    from loraloom.evaluation.toyworld.manifest import manifest as toy_manifest
    from loraloom.evaluation.toyworld.manifest import write_manifest

    path = write_manifest(tmp_path / "benchmark.yaml")
    m = load_manifest(path)
    data = toy_manifest()
    assert m.name == "toyworld" and len(m.loras) == 11 and len(m.sets) == 240
    assert m.counts() == {("toyworld", 2): 24, ("toyworld", 3): 72, ("toyworld", 4): 96, ("toyworld", 5): 48}
    assert m.checker == (tmp_path / "checker").resolve() and m.clip == "clip"
    assert m.model_ref("toyworld") == str((tmp_path / "model").resolve())
    for s, raw in zip(m.sets, data["sets"]):
        assert (s.id, s.lora_ids, m.prompt(s), m.scoring_text(s), s.expected) == \
            (raw["id"], raw["loras"], raw["prompt"], raw["scoring_text"], raw["expected"])
    st = m.settings(m.sets[0])
    assert (st.height, st.width, st.scheduler, st.lora_scale) == (32, 32, "default", 1.0)
