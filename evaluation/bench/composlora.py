"""Builds `assets/composlora/manifest.yaml`, the ComposLoRA testbed (Zhong et al. 2024, "Multi-LoRA Composition
for Image Generation") as a loraloom benchmark manifest, from the reference repository's LoRA metadata
(`anime_lora_info.json`, `reality_lora_info.json`: ids, names, trigger words, civitai URLs).

Sets (docs/methods/composlora.md#testbed): one character plus n-1 LoRAs of distinct other categories; for each (n-1)-combination of
the categories clothing, style, background, object (in that order) the Cartesian product of the character
instances and the chosen categories' instances. Per style n=2: 24, n=3: 72, n=4: 96, n=5: 48 (240), 480 in all.
Settings (docs/methods/composlora.md#setup): anime Counterfeit-V2.5, 512x512, 200 steps, CFG 10; reality Realistic Vision V5.1 + the ft-MSE VAE,
1024 (H) x 768 (W), 100 steps, CFG 7; DPM-Solver++; LoRA scale 0.8; seed 111.

    python -m loraloom.evaluation.bench.composlora path/to/Multi-LoRA-Composition assets/composlora/manifest.yaml
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import yaml

from .manifest import FORMAT

SOURCE = {
    "repository": "https://github.com/maszhongming/Multi-LoRA-Composition",
    "commit": "cac122a0e2f13fbf4049fd7cc6d6ebe282c14546",
    "files": ["anime_lora_info.json", "reality_lora_info.json", "utils.py (get_prompt)", "compose_anime.sh", "compose_reality.sh"],
    "paper": "Zhong et al. 2024, Multi-LoRA Composition for Image Generation, arXiv 2402.16843",
    "licence": "The upstream repository has no licence file. This manifest holds only factual metadata derived from it "
               "(LoRA ids, names, trigger words, civitai URLs, the prompts and sampler settings the reference scripts use), "
               "for evaluation. The LoRA weights are not included; each is under its own civitai model licence. Three "
               "reality character LoRAs depict real people (likeness and consent caveats apply).",
}
LORA_SOURCE = ("ComposLoRA.zip (Google Drive file id 1SuwRgV1LtEud8dfjftnw-zxBMgzSCwIT) unzipped; --lora-dir is its "
               "models/lora folder, which holds anime/<id>.safetensors and reality/<id>.safetensors")

STYLES = {
    "anime": {
        "model": "gsdf/Counterfeit-V2.5", "steps": 200, "guidance_scale": 10, "height": 512, "width": 512,
        "prompt": "masterpiece, best quality, {triggers}",
        "negative_prompt": "EasyNegative, extra fingers, extra limbs, fewer fingers, fewer limbs, multiple girls, multiple views, "
                           "worst quality, low quality, depth of field, blurry, greyscale, 3D face, cropped, lowres, text, jpeg "
                           "artifacts, signature, watermark, username, blurry, artist name, trademark, watermark, title, "
                           "reference sheet, curvy, plump, fat, muscular female, strabismus, clothing cutout, side slit, tattoo, nsfw",
    },
    "reality": {
        "model": "SG161222/Realistic_Vision_V5.1_noVAE", "vae": "stabilityai/sd-vae-ft-mse", "steps": 100,
        "guidance_scale": 7, "height": 1024, "width": 768,
        "prompt": "RAW photo, subject, 8k uhd, dslr, high quality, Fujifilm XT3, half-length portrait from knees up, {triggers}",
        "negative_prompt": "extra heads, nsfw, deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, "
                           "drawing, anime, text, cropped, out of frame, worst quality, low quality, jpeg artifacts, ugly, "
                           "duplicate, morbid, mutilated, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, "
                           "mutation, deformed, blurry, dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, "
                           "disfigured, gross proportions, malformed limbs, missing arms, missing legs, extra arms, extra legs, "
                           "fused fingers, too many fingers, long neck",
    },
}
DEFAULTS = {"scheduler": "dpmsolver++", "lora_scale": 0.8, "seeds": [111], "seeding": "derived"}
SIZES = (2, 3, 4, 5)


def composition_sets(info: dict, n: int) -> list[list[dict]]:
    """ComposLoRA's sets of n LoRAs in the reference enumeration order (character first, then the other categories
    in the JSON's key order; combinations of categories, then the product of their instances)."""
    others = [c for c in info if c != "character"]
    out = []
    for cats in itertools.combinations(others, n - 1):
        for combo in itertools.product(*(info[c] for c in ("character", *cats))):
            out.append(list(combo))
    return out


def build_manifest(infos: dict[str, dict]) -> dict:
    """`infos`: style -> the style's `*_lora_info.json` content."""
    loras, sets = [], []
    for style, info in infos.items():
        for category, entries in info.items():
            for e in entries:
                loras.append({"id": f"{style}/{e['id']}", "name": e["name"], "category": category,
                              "triggers": list(e["trigger"]), "file": f"{style}/{e['id']}.safetensors", "url": e["url"]})
        for n in SIZES:
            for i, combo in enumerate(composition_sets(info, n)):
                sets.append({"id": f"{style}-n{n}-{i:03d}", "base_model": style, "loras": [f"{style}/{e['id']}" for e in combo]})
    return {
        "format": FORMAT,
        "name": "composlora",
        "description": "ComposLoRA (Zhong et al. 2024): 22 LoRAs (11 anime, 11 reality: 3 characters and 2 each of clothing, "
                       "style, background, object), 480 composition sets of 2-5 LoRAs with one character each, in the "
                       "reference enumeration order, with the reference prompts and sampler settings.",
        "source": SOURCE,
        "lora_source": LORA_SOURCE,
        "base_models": {style: dict(cfg) for style, cfg in STYLES.items() if style in infos},
        "defaults": dict(DEFAULTS),
        "loras": loras,
        "sets": sets,
    }


HEADER = """\
# ComposLoRA benchmark manifest (loraloom-benchmark/1; see docs/benchmarks.md).
# Generated by `python -m loraloom.evaluation.bench.composlora` from the reference repository's LoRA metadata:
#   https://github.com/maszhongming/Multi-LoRA-Composition @ cac122a0e2f13fbf4049fd7cc6d6ebe282c14546
#   (Zhong et al. 2024, "Multi-LoRA Composition for Image Generation", arXiv 2402.16843).
# Factual metadata only (ids, names, trigger words, civitai URLs, prompts and sampler settings); the upstream
# repository has no licence file, see `source.licence`. LoRA weights are not included: pass --lora-dir.
"""


def write_manifest(src: str | Path, out: str | Path) -> Path:
    src, out = Path(src), Path(out)
    infos = {style: json.loads((src / f"{style}_lora_info.json").read_text(encoding="utf-8")) for style in STYLES}
    out.parent.mkdir(parents=True, exist_ok=True)
    data = build_manifest(infos)
    loras, sets = data.pop("loras"), data.pop("sets")
    body = yaml.safe_dump(data, sort_keys=False, width=120, allow_unicode=True)
    body += "loras:\n" + yaml.safe_dump(loras, sort_keys=False, width=120, allow_unicode=True, default_flow_style=None)
    body += "sets:\n" + "".join(yaml.safe_dump([s], sort_keys=False, width=1000, default_flow_style=True)[1:-2].join(["- ", "\n"])
                                for s in sets)
    out.write_text(HEADER + body, encoding="utf-8")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        sys.exit(2)
    print(write_manifest(*args))
