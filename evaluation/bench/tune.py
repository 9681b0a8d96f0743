"""`loraloom bench tune`: each method's sampler settings chosen on held-out sets and seeds (issue 25, point 4).

The papers ran their methods at different sampler settings (Composite at CFG 7-10, Merge at the LoRA authors'
usual 7, the toy world's single LoRAs at 2), so a table at one setting favours the method that setting suits.
Tuning is a small grid search, done where the reported numbers are not:

- sets: `per_group` sets of every (group, number of LoRAs), chosen by a hash of their ids (`tuning_sets`), so the
  choice does not depend on manifest order; `bench run --tuned` leaves these sets out;
- seeds: `TUNE_SEED_BASE + k`, never a manifest's seed (`tuning_seeds`);
- score: the toy-world checker's all-concepts share where the manifest has a checker, else CLIPScore; the setting
  with the best mean over the tuning sets wins, ties going to the cheaper setting (fewer steps, then lower CFG).

Every grid point is an ordinary benchmark folder under `DIR/grid/<setting>/` (resumable like `bench run`), and
the choice is `DIR/tuned.json`, which `bench run --tuned DIR/tuned.json` reads.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from loraloom.composition.errors import SpecError

from .manifest import BenchSet, Manifest
from .plan import MethodVariant

TUNE_SEED_BASE = 900_000  # tuning seeds: TUNE_SEED_BASE + k (no manifest uses seeds this high)
TUNED_FORMAT = "loraloom-bench-tuned/1"
GRID_KEYS = {"cfg": "guidance_scale", "guidance_scale": "guidance_scale", "steps": "steps", "scheduler": "scheduler"}


def parse_grid(items: list[str]) -> list[dict]:
    """`["cfg=2,4,7", "steps=25,50"]` → every combination as sampler settings
    (`[{"guidance_scale": 2.0, "steps": 25}, …]`), in the order cheapest first (steps, then CFG)."""
    axes: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or key not in GRID_KEYS:
            raise SpecError(f"--grid {item!r}: write KEY=V1,V2,… with KEY one of {', '.join(GRID_KEYS)}")
        name = GRID_KEYS[key]
        if name in axes:
            raise SpecError(f"--grid names {name} twice")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise SpecError(f"--grid {item!r}: no values")
        try:
            axes[name] = [_value(name, v) for v in vals]
        except ValueError as err:
            raise SpecError(f"--grid {item!r}: {err}") from None
        if len(set(axes[name])) != len(axes[name]):
            raise SpecError(f"--grid {item!r}: a value is listed twice")
    if not axes:
        raise SpecError("--grid is empty; e.g. --grid cfg=2,4,7 steps=25,50")
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    return sorted(combos, key=cost_key)


def _value(name: str, text: str):
    if name == "steps":
        if not text.isdigit() or not 1 <= int(text) <= 1000:
            raise ValueError(f"steps {text!r} is not a whole number from 1 to 1000")
        return int(text)
    if name == "guidance_scale":
        v = float(text)
        if not (math.isfinite(v) and 0 <= v <= 100):
            raise ValueError(f"cfg {text!r} is not a number from 0 to 100")
        return v
    return text


def cost_key(setting: dict) -> tuple:
    """Cheaper first: fewer steps, then lower CFG, then the scheduler's name."""
    return (setting.get("steps", 0), setting.get("guidance_scale", 0.0), str(setting.get("scheduler", "")))


def setting_name(setting: dict) -> str:
    """A folder name for a grid point: `cfg=2_steps=25`."""
    short = {"guidance_scale": "cfg", "steps": "steps", "scheduler": "scheduler"}
    return "_".join(f"{short[k]}={setting[k]:g}" if isinstance(setting[k], float) else f"{short[k]}={setting[k]}"
                    for k in sorted(setting))


def tuning_sets(manifest: Manifest, sets: list[BenchSet], per_group: int) -> list[BenchSet]:
    """`per_group` sets of every (group, number of LoRAs) among `sets`, the ones whose sha256("tune:<id>") is
    smallest: fixed for a manifest, independent of set order; returned in manifest order."""
    if per_group < 1:
        raise SpecError(f"--sets-per-group {per_group}: at least 1")
    by_cell: dict[tuple[str, int], list[BenchSet]] = {}
    for s in sets:
        by_cell.setdefault((s.group, s.n), []).append(s)
    chosen = set()
    for cell in by_cell.values():
        ranked = sorted(cell, key=lambda s: hashlib.sha256(f"tune:{s.id}".encode()).hexdigest())
        chosen.update(s.id for s in ranked[:per_group])
    return [s for s in sets if s.id in chosen]


def tuning_seeds(k: int) -> tuple[int, ...]:
    if k < 1:
        raise SpecError(f"--seeds {k}: at least 1")
    return tuple(TUNE_SEED_BASE + i for i in range(k))


def choose(means: dict[str, dict[str, float]], settings: list[dict]) -> dict[str, str]:
    """{method label: {setting name: mean score}} → {method label: the winning setting's name}: the highest mean;
    among equal means the cheapest (the order of `settings`). A method with no finite score gets no choice."""
    names = [setting_name(s) for s in sorted(settings, key=cost_key)]
    out = {}
    for label, by_setting in means.items():
        scored = [(by_setting[n], -i, n) for i, n in enumerate(names) if n in by_setting and math.isfinite(by_setting[n])]
        if scored:
            out[label] = max(scored)[2]
    return out


@dataclass
class TuneResult:
    metric: str
    settings: list[dict]
    means: dict[str, dict[str, float]]  # method label -> setting name -> mean over the tuning sets (seeds averaged first)
    choices: dict[str, dict] = field(default_factory=dict)  # method label -> the chosen sampler settings

    def lines(self) -> list[str]:
        names = [setting_name(s) for s in self.settings]
        width = max(len(n) for n in names)
        out = [f"tuning metric: {self.metric} (mean over the tuning sets; best per method marked *)"]
        for label, by_setting in self.means.items():
            chosen = setting_name(self.choices[label]) if label in self.choices else None
            cells = [f"{n:>{width}} {by_setting.get(n, math.nan):.3f}{'*' if n == chosen else ' '}" for n in names]
            out.append(f"{label}: " + "  ".join(cells))
        for label, s in self.choices.items():
            out.append(f"tuned {label} {setting_name(s)}")
        return out


def metric_means(folder: Path, metric: str) -> dict[str, float]:
    """{method label: mean of `metric` over sets (each set's seeds averaged first)} of one benchmark folder."""
    from .report import load_report_data

    data = load_report_data(folder)
    rows = [r for m in data.metrics if m.metric == metric for r in m.rows]
    out = {}
    for label in data.methods:
        per_set: dict[str, list[float]] = {}
        for r in rows:
            if r["method_label"] == label and r["value"] is not None:
                per_set.setdefault(r["set_id"], []).append(float(r["value"]))
        out[label] = sum(sum(v) / len(v) for v in per_set.values()) / len(per_set) if per_set else math.nan
    return out


@dataclass
class TuneOptions:
    manifest: Manifest
    out: Path
    variants: list[MethodVariant]
    settings: list[dict]  # parse_grid
    sets: list[BenchSet]  # the sets tuning may draw from (all of the manifest's, or --sets)
    per_group: int = 2
    seeds: int = 2
    lora_dir: str | Path | None = None
    overrides: dict = field(default_factory=dict)  # run-wide sampler settings not tuned (e.g. --height)
    device: str = "auto"
    dtype: str = "float32"
    allow_download: bool = False
    progress: bool = True
    threads: int | None = None
    clip: str | None = ""  # CLIP for scoring when the manifest has no checker ("" = the manifest's)
    cache: object | None = None  # a PipelineCache to share across grid points (library use, tests)


def tune(opts: TuneOptions) -> TuneResult:
    """Run every grid point on the tuning sets and seeds, score, choose, and write `out/tuned.json`."""
    from loraloom.composition.files import WritePolicy, write_file

    from .runner import RunOptions, run_benchmark
    from .scoring import ScoreOptions, score_folder

    sets = tuning_sets(opts.manifest, opts.sets, opts.per_group)
    seeds = tuning_seeds(opts.seeds)
    checker = opts.manifest.checker is not None and Path(opts.manifest.checker).is_dir()
    metric = "checker.all" if checker else "clipscore"
    means: dict[str, dict[str, float]] = {v.label: {} for v in opts.variants}
    for setting in opts.settings:
        folder = Path(opts.out) / "grid" / setting_name(setting)
        overrides = {**opts.overrides, **setting, "seeds": seeds}
        run_benchmark(RunOptions(manifest=opts.manifest, out=folder, variants=opts.variants, sets=sets,
                                 lora_dir=opts.lora_dir, overrides=overrides, device=opts.device, dtype=opts.dtype,
                                 allow_download=opts.allow_download, progress=opts.progress, threads=opts.threads,
                                 argv=["bench", "tune", setting_name(setting)], cache=opts.cache))
        score_folder(ScoreOptions(folder=folder, manifest=opts.manifest.path, clip=None if checker else opts.clip,
                                  checker=checker, device=opts.device, allow_download=opts.allow_download,
                                  progress=opts.progress))
        for label, value in metric_means(folder, metric).items():
            if label in means:
                means[label][setting_name(setting)] = value
    by_name = {setting_name(s): s for s in opts.settings}
    result = TuneResult(metric=metric, settings=opts.settings, means=means,
                        choices={label: by_name[name] for label, name in choose(means, opts.settings).items()})
    record = {
        "format": TUNED_FORMAT, "manifest": opts.manifest.name, "manifest_sha256": opts.manifest.sha256,
        "metric": metric, "grid": opts.settings, "tuning_sets": [s.id for s in sets], "tuning_seeds": list(seeds),
        "overrides": {k: v for k, v in opts.overrides.items() if v is not None}, "means": means,
        "choices": result.choices,
    }
    text = json.dumps(record, indent=1)
    write_file("tuned.json", lambda tmp: tmp.write_text(text, encoding="utf-8"), WritePolicy.at(opts.out),
               what="tuning result")
    return result


@dataclass
class Tuned:
    """What `bench run --tuned FILE` uses: per-method sampler settings and the sets to leave out."""

    path: Path
    choices: dict[str, dict]
    tuning_sets: set[str]
    tuning_seeds: tuple[int, ...]
    manifest_sha256: str | None


def read_tuned(path: str | Path, manifest: Manifest, variants: list[MethodVariant]) -> Tuned:
    """Read `tuned.json`; refuse one made for another manifest or lacking a method of this run."""
    from loraloom.composition.errors import LoraloomError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraloomError(f"--tuned {path}: cannot be read ({err}); pass the tuned.json `loraloom bench tune` wrote") from None
    if not isinstance(data, dict) or data.get("format") != TUNED_FORMAT or not isinstance(data.get("choices"), dict):
        raise LoraloomError(f"--tuned {path}: not a `loraloom bench tune` result ({TUNED_FORMAT}); run `loraloom bench tune` first")
    if data.get("manifest_sha256") not in (None, manifest.sha256):
        raise LoraloomError(f"--tuned {path}: tuned on another version of manifest {data.get('manifest')!r}; tune again "
                            f"for {manifest.path}")
    def key(label: str) -> str:  # `merge+regions` runs at what `merge` was tuned to, unless tuned itself
        return label if label in data["choices"] else label.removesuffix("+regions")

    missing = [v.label for v in variants if key(v.label) not in data["choices"]]
    if missing:
        raise LoraloomError(f"--tuned {path}: no tuned settings for {', '.join(missing)} (it has "
                            f"{', '.join(data['choices']) or 'none'}); tune those methods too or leave them out of --methods")
    allowed = set(GRID_KEYS.values())
    choices = {}
    for label in (v.label for v in variants):
        setting = data["choices"][key(label)]
        if not isinstance(setting, dict) or not set(setting) <= allowed:
            raise LoraloomError(f"--tuned {path}: the settings of {label} ({setting!r}) are not sampler settings")
        for name, value in setting.items():
            try:
                _value(name, str(value))
            except ValueError as err:
                raise LoraloomError(f"--tuned {path}: {label}: {err}; run `loraloom bench tune` again") from None
        choices[label] = setting
    return Tuned(path=path, choices=choices, tuning_sets=set(data.get("tuning_sets", [])),
                 tuning_seeds=tuple(data.get("tuning_seeds", [])), manifest_sha256=data.get("manifest_sha256"))
