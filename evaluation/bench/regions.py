"""Regions of a benchmark's sets (`loraloom bench run --regions`): where each LoRA of a set acts, bound to it for the
methods that take regions (issue 23, point 8; Regional Prompter's latent mode / attention couple, docs/controls.md).

A set's regions are {LoRA id: mask}, a mask being a named region of `composition.spatial.NAMED_REGIONS` ("full" =
everywhere) or a box [x0, y0, x1, y1] in fractions of the image ((0, 0) = top left). They come from, first to last:
the set's own `regions:` entry in the manifest, then a regions file — the one given to `--regions FILE`, else the
`regions.yaml` beside the manifest (the toy world ships one, derived from its scene layout by
`evaluation/toyworld/regions.py`). A regions file is YAML: `sets: {set id: {LoRA id: mask}}` (other top-level keys
such as `format` and `description` are read as documentation).

`region_refs` turns a set's mapping into the spec's `RegionRef`s as the toy world's check does
(`group_regions`): a LoRA whose mask is the whole image acts everywhere, unmasked; the other LoRAs that share a mask
share one region with the run's prompt (one prompt copy in the cross-attention), in the set's LoRA order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loraloom.composition.errors import SpecError
from loraloom.composition.spatial import NAMED_REGIONS

FILE_NAME = "regions.yaml"  # the regions file beside a manifest
FULL = "full"


@dataclass
class BenchRegions:
    """{set id: {LoRA id: mask}} with where they were read (`source`: the file, or the manifest's own entries)."""

    sets: dict[str, dict[str, object]] = field(default_factory=dict)
    source: str = ""
    sha256: str | None = None  # of the regions file's bytes

    def of(self, set_id: str) -> dict[str, object] | None:
        return self.sets.get(set_id)


def checked_region(value, where: str) -> str | list[float]:
    """A named region (lower case) or a box of four fractions with x0 < x1, y0 < y1; `SpecError` naming `where`."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in NAMED_REGIONS:
            return key
    elif isinstance(value, Sequence) and len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                 for v in value):
        box = [float(v) for v in value]
        if all(0.0 <= v <= 1.0 for v in box) and box[0] < box[2] and box[1] < box[3]:
            return box
    raise SpecError(f"{where}: region {value!r} is neither a named region ({', '.join(NAMED_REGIONS)}) nor a box "
                    "[x0, y0, x1, y1] of fractions 0..1 with x0 < x1 and y0 < y1 ((0, 0) is the top-left corner). "
                    "Fix: write one of those.")


def checked_set_regions(value, lora_ids: Sequence[str], where: str) -> dict[str, object]:
    """A set's {LoRA id: region}: a mapping naming every LoRA of the set and nothing else."""
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: regions must be a mapping {{LoRA id: region}}, got {value!r}")
    unknown = [k for k in value if k not in lora_ids]
    if unknown:
        raise SpecError(f"{where}: {', '.join(map(str, unknown))} {'is' if len(unknown) == 1 else 'are'} not a LoRA of the "
                        f"set ({', '.join(lora_ids)}). Fix: name the set's LoRAs by their ids.")
    missing = [lid for lid in lora_ids if lid not in value]
    if missing:
        raise SpecError(f"{where}: no region for {', '.join(missing)}. Fix: give every LoRA of the set a region "
                        f"('{FULL}' for everywhere).")
    return {lid: checked_region(value[lid], f"{where}.{lid}") for lid in lora_ids}


def read_regions_file(path: str | Path) -> tuple[dict[str, Mapping], str]:
    """The `sets` mapping of a regions file and the sha256 of its bytes; `SpecError` naming the file."""
    from loraloom.composition.files import read_yaml_file

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"--regions: {path} is not a file. Fix: name a regions file (YAML with `sets: {{set id: {{LoRA id: "
                        f"region}}}}`), or put {FILE_NAME} beside the manifest.")
    raw = path.read_bytes()
    data = read_yaml_file(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("sets"), Mapping):
        raise SpecError(f"{path}: a regions file is a mapping with `sets: {{set id: {{LoRA id: region}}}}`; this one has "
                        "no `sets` mapping")
    return dict(data["sets"]), hashlib.sha256(raw).hexdigest()


def load_bench_regions(manifest, sets, path: str | Path | None = None) -> BenchRegions:
    """The regions of `sets`: a set's own `regions:` entry, else the regions file (`path`, default the manifest's
    sibling `regions.yaml`, read only when some set needs it). Every set must have regions (SpecError naming the
    sets without and the file looked in)."""
    need = [s for s in sets if not s.regions]
    out = BenchRegions(source="the manifest's set entries")
    file_sets: dict[str, Mapping] = {}
    file = Path(path).expanduser() if path else Path(manifest.path).parent / FILE_NAME
    if need:
        if not path and not file.is_file():
            shown = ", ".join(s.id for s in need[:5]) + (f" and {len(need) - 5} more" if len(need) > 5 else "")
            raise SpecError(f"--regions: set(s) {shown} have no regions: no `regions:` entry in the manifest and no "
                            f"{FILE_NAME} beside it ({file}). Fix: write one of those, name a regions file "
                            "(--regions FILE), or run without --regions.")
        file_sets, out.sha256 = read_regions_file(file)
        out.source = str(file.resolve())
    for s in sets:
        if s.regions:
            out.sets[s.id] = dict(s.regions)  # checked when the manifest was read
            continue
        if s.id not in file_sets:
            missing = [x.id for x in need if x.id not in file_sets]
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise SpecError(f"--regions: set(s) {shown} have no regions in {file}. Fix: add them there (or as the sets' "
                            "`regions:` entries), or leave those sets out (--sets), or run without --regions.")
        out.sets[s.id] = checked_set_regions(file_sets[s.id], s.lora_ids, f"{file}: sets.{s.id}")
    return out


def is_full(region) -> bool:
    return isinstance(region, str) and region.strip().lower() == FULL


def group_regions(lora_ids: Sequence[str], regions: Mapping[str, object]) -> tuple[list[str], list[tuple[object, list[str]]]]:
    """(LoRAs acting everywhere, [(mask, LoRAs sharing it)]) in `lora_ids` order: a LoRA whose region is the whole
    image, or that has none, acts unmasked; LoRAs with equal masks share one region."""
    plain, groups = [], {}
    for name in lora_ids:
        region = regions.get(name, FULL)
        if is_full(region):
            plain.append(name)
        else:
            key = tuple(float(v) for v in region) if isinstance(region, (list, tuple)) else region
            groups.setdefault(key, []).append(name)
    return plain, [(list(k) if isinstance(k, tuple) else k, names) for k, names in groups.items()]


def region_refs(lora_ids: Sequence[str], regions: Mapping[str, object]) -> list:
    """The spec's `RegionRef`s of a set (`group_regions`; each region takes the run's prompt)."""
    from loraloom.pipelines.spec import RegionRef

    return [RegionRef(mask=mask, loras=list(names)) for mask, names in group_regions(lora_ids, regions)[1]]
