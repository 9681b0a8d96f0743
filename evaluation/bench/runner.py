"""`loraloom bench run`: generate every (set × method × seed) of a manifest that the store does not hold yet.

Under `accelerate launch` every process takes its deterministic shard of the canonical work list (item i goes to
process i mod P; `plan.shard`) and writes into the same store (SQLite WAL; concurrent writers queue for the write
lock). A failed item is recorded with its error and the run goes on; the next run retries it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
import traceback
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraloom.composition.errors import LoraloomError, SpecError
from loraloom.composition.files import remove_stale_temps
from loraloom.composition.lora_file import file_sha256
from loraloom.pipelines.batch import PipelineCache, generate_image, pipeline_arguments
from loraloom.pipelines.composed import check_offload
from loraloom.pipelines.spec import GenerationSpec, save_png

from .manifest import BenchSet, Manifest, missing_files
from .plan import FileHashes, MethodVariant, WorkItem, build_plan, reference_generator, scheduler_draws_noise, shard
from .regions import BenchRegions
from .store import Store, now

log = logging.getLogger(__name__)


class MissingFilesError(LoraloomError):
    """LoRA files or base models the selected sets need are not there (reported before anything is generated)."""


class StaleStoreError(LoraloomError):
    """The output folder holds images of the same items made with other settings."""


@dataclass
class RunOptions:
    manifest: Manifest
    out: Path
    variants: list[MethodVariant]
    sets: list[BenchSet]
    seeds: int | None = None
    reference_seeding: bool = False
    lora_dir: str | Path | None = None
    overrides: dict = field(default_factory=dict)  # sampler settings replaced for every set (quick runs)
    variant_overrides: dict = field(default_factory=dict)  # {method label: sampler settings}: `bench run --tuned`
    regions: BenchRegions | None = None  # the sets' regions, for the variants with `regions` (`bench run --regions`)
    device: str = "auto"
    dtype: str = "float32"
    allow_download: bool = False
    retry_failed: bool = True
    progress: bool = True
    threads: int | None = None
    argv: list[str] = field(default_factory=list)
    cache: PipelineCache | None = None  # reuse loaded pipelines across runs in one process (library use, tests)
    offload: str | None = None  # 'model' / 'sequential': --cpu-offload / --sequential-offload (`ComposedPipeline.enable_offload`)


@dataclass
class RunSummary:
    planned: int  # items of the whole plan (all processes)
    assigned: int  # items of this process's shard
    already_done: int
    generated: int = 0
    failed: int = 0
    wall_seconds: float = 0.0
    generation_seconds: float = 0.0
    process_index: int = 0
    num_processes: int = 1
    done_total: int | None = None  # main process, after all processes finished: done items of the plan
    failed_total: int | None = None
    run_id: str = ""


class Distributed:
    """Process index / count and device: from accelerate's `PartialState` under `accelerate launch`
    (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.state = None
        if self.world > 1:
            from accelerate import PartialState

            cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available()) or \
                os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
            self.state = PartialState(cpu=cpu)
            self.index, self.count = self.state.process_index, self.state.num_processes
            self.device = "cpu" if cpu else str(self.state.device)
        else:
            self.index, self.count = 0, 1
            self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def broadcast(self, value):
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def close(self) -> None:
        if self.state is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class BenchPipelines:
    """The pipeline cache of `loraloom generate`, plus what a benchmark adds: the base model's VAE override,
    LoRA categories from the manifest, and the sampler check of reference seeding."""

    def __init__(self, device: str, allow_download: bool, reference_seeding: bool, cache: PipelineCache | None = None,
                 offload: str | None = None):
        self.cache = cache or PipelineCache(device=device, local_files_only=not allow_download, offload=offload)
        self.reference_seeding = reference_seeding
        self.allow_download = allow_download
        self._prepared = None

    def model(self, item: WorkItem):
        """Load the base model (errors here stop the run: every item would fail the same way)."""
        cp = self.cache.get(dataclasses.replace(item.spec, loras=[], regions=[], base_weight=0.0))
        if cp is not self._prepared:
            if item.vae:
                self._swap_vae(cp, item)
            if self.reference_seeding:
                # the family's sampler ('default' is the model's own; FLUX/SD3 refuse the SD samplers here)
                sched = cp.arch.make_scheduler(item.spec.scheduler, None, cp.default_size, cp.default_size, "cpu")
                if scheduler_draws_noise(sched):
                    raise SpecError(f"--reference-seeding: the sampler {item.spec.scheduler!r} draws noise at every step, so "
                                    "the reference stream cannot be fast-forwarded per image; use a deterministic sampler "
                                    "(dpmsolver++, ddim, euler …) or the default per-image seeds.")
            self._prepared = cp
        return cp

    def _swap_vae(self, cp, item: WorkItem) -> None:
        from diffusers import AutoencoderKL

        from loraloom.pipelines.loading import _dtype

        vae = AutoencoderKL.from_pretrained(item.vae, local_files_only=not self.allow_download, torch_dtype=_dtype(item.spec.dtype))
        cp.pipe.vae = vae.to(cp.device)

    def with_loras(self, item: WorkItem):
        cp = self.cache.get(item.spec)
        for ref in item.spec.loras:  # the manifest says what each LoRA is (ComposLoRA files carry no sidecar)
            lora = cp.loras[ref.adapter_name]
            if ref.category:
                lora.info.category = ref.category
            if ref.triggers:
                lora.info.triggers = list(ref.triggers)
        return cp


def generate(cp, item: WorkItem, out: Path):
    """One image: the spec's own seed, or the reference stream fast-forwarded to the item's position; files the
    method writes stay in the run's folder `out`."""
    spec = item.spec
    if item.reference_position is None:
        return generate_image(cp, spec, out)
    height, width = spec.height or cp.default_size, spec.width or cp.default_size
    g = reference_generator(spec.seed, item.reference_position, cp.arch.latent_shape(height, width))
    return cp(spec.prompt, negative_prompt=spec.negative_prompt, method=spec.method, method_params=spec.method_params,
              num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale, height=spec.height, width=spec.width,
              generator=g, scheduler=spec.scheduler, progress_bar=False, output_dir=out, **pipeline_arguments(spec))


def prompt_tokens(cp, prompt: str) -> int:
    """Tokens of the prompt for the (first) text encoder, start and end tokens included."""
    return len(cp.pipe.tokenizer(prompt, truncation=False).input_ids)


def item_row(item: WorkItem, **fields) -> dict:
    return {"item_id": item.item_id, "set_id": item.set.id, "method": item.variant.name, "method_label": item.variant.label,
            "seed_index": item.seed_index, "seed_value": item.seed_value, "seed": item.seed,
            "reference_position": item.reference_position, "n_loras": item.set.n, "grp": item.set.group,
            "base_model": item.set.base_model, "fingerprint": item.fingerprint, "spec": item.spec.to_json(),
            "finished_at": now(), **fields}


def _clean_temp_files(out: Path) -> int:
    """Half-written PNGs of a killed run (save_png's temp files); only called while no process is writing."""
    n = 0
    for folder in (out / "images").glob("*"):
        n += len(remove_stale_temps(folder))
    return n


def seeding_mode(opts: RunOptions) -> str:
    return "reference" if opts.reference_seeding else "per-image"


def run_benchmark(opts: RunOptions) -> RunSummary:
    """Generate what is missing; returns this process's summary (the main process's has the totals)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    check_offload(opts.offload, opts.device)  # no accelerator: refused before the store is touched
    missing = missing_files(opts.manifest, opts.sets, opts.lora_dir)
    if missing:
        raise MissingFilesError(missing.message(opts.manifest, opts.manifest.lora_folder(opts.lora_dir)))
    dist = Distributed(opts.device)
    try:
        return _run(opts, dist)
    finally:
        dist.close()


def _run(opts: RunOptions, dist: Distributed) -> RunSummary:
    started = time.perf_counter()
    plan = build_plan(opts.manifest, opts.sets, opts.variants, seeds=opts.seeds, reference_seeding=opts.reference_seeding,
                      lora_dir=opts.lora_dir, overrides=opts.overrides, dtype=opts.dtype, hashes=FileHashes(),
                      variant_overrides=opts.variant_overrides, regions=opts.regions)
    out = Path(opts.out)
    store = Store(out)  # every process opens it at once: Store waits out the others' schema and WAL switch
    meta = store.claim_meta({"format": "loraloom-bench-store/1", "seeding": seeding_mode(opts), "manifest_name": opts.manifest.name,
                             "created_at": now()})
    if meta["seeding"] != seeding_mode(opts):
        raise StaleStoreError(f"{out} holds a run with {meta['seeding']} seeding; this run asks for {seeding_mode(opts)} "
                              "seeding. Use another --out (the two kinds of images must not be mixed).")
    if dist.is_main:
        store.set_meta("manifest_path", str(opts.manifest.path))
        store.set_meta("manifest_sha256", opts.manifest.sha256)
        if opts.regions is not None and any(v.regions for v in opts.variants):  # what the +regions labels used
            store.set_meta("regions", opts.regions.source)
            store.set_meta("regions_sha256", opts.regions.sha256 or "")
        _clean_temp_files(out)
    run_id = dist.broadcast(uuid.uuid4().hex[:12] if dist.is_main else None)
    dist.barrier()  # nobody writes a PNG before the temp files of a killed run are gone

    states = store.item_states()
    stale = [it for it in plan if (st := states.get(it.item_id)) is not None and st["status"] == "done"
             and st["fingerprint"] != it.fingerprint]
    if stale:
        raise StaleStoreError(
            f"{out} holds {len(stale)} image(s) of this plan made with other settings (e.g. {stale[0].item_id}); "
            "a run never mixes them. Use another --out, or the settings of the first run.")
    mine = shard(plan, dist.index, dist.count)
    todo = []
    for it in mine:
        st = states.get(it.item_id)
        if st is None:
            todo.append(it)
        elif st["status"] == "done" and not (out / st["png"]).is_file():
            log.warning("%s: its PNG %s is gone; making it again", it.item_id, st["png"])
            store.forget_item(it.item_id)
            todo.append(it)
        elif st["status"] == "failed" and opts.retry_failed:
            todo.append(it)
    summary = RunSummary(planned=len(plan), assigned=len(mine), already_done=len(mine) - len(todo),
                         process_index=dist.index, num_processes=dist.count, run_id=run_id)
    store.start_run(run_id, dist.index, dist.count, opts.argv, dist.device, socket.gethostname(), len(mine), summary.already_done)
    try:
        _generate_all(opts, dist, store, todo, summary)
    finally:
        summary.wall_seconds = time.perf_counter() - started
        store.update_run(run_id, dist.index, finished_at=now(), generated=summary.generated, failed=summary.failed,
                         generation_seconds=round(summary.generation_seconds, 3), wall_seconds=round(summary.wall_seconds, 3))
    dist.barrier()
    if dist.is_main:
        states = store.item_states()
        ids = [it.item_id for it in plan]
        summary.done_total = sum(1 for i in ids if i in states and states[i]["status"] == "done")
        summary.failed_total = sum(1 for i in ids if i in states and states[i]["status"] == "failed")
    store.close()
    return summary


def _generate_all(opts: RunOptions, dist: Distributed, store: Store, todo: list[WorkItem], summary: RunSummary) -> None:
    from tqdm.auto import tqdm

    pipes = BenchPipelines(dist.device, opts.allow_download, opts.reference_seeding, opts.cache, opts.offload)
    first = {}
    for it in todo:
        first.setdefault(it.set.base_model, len(first))
    todo = sorted(todo, key=lambda it: first[it.set.base_model])  # one base model after the other (stable sort)
    desc = f"bench {opts.manifest.name}" + (f" [{dist.index + 1}/{dist.count}]" if dist.count > 1 else "")
    bar = tqdm(total=summary.assigned, initial=summary.already_done, unit="img", desc=desc, disable=not opts.progress,
               position=dist.index if dist.count > 1 else None, dynamic_ncols=True, file=sys.stderr)
    long_prompts: set[str] = set()
    kept = ExitStack()  # each base model keeps Merge's fused weights between items with the same LoRAs and gates
    held: set[int] = set()
    try:
        for it in todo:
            cp = pipes.model(it)  # a base model that cannot load stops the run
            if id(cp) not in held:
                held.add(id(cp))
                kept.enter_context(cp.keep_fused())
            if it.set.id not in long_prompts and (n := prompt_tokens(cp, it.spec.prompt)) > cp.pipe.tokenizer.model_max_length:
                long_prompts.add(it.set.id)
                log.warning("set %s: the prompt has %d tokens; the text encoder reads %d, so its tail (the last LoRAs' "
                            "trigger words) is cut, as in diffusers", it.set.id, n, cp.pipe.tokenizer.model_max_length)
            t0 = time.perf_counter()
            try:
                cp = pipes.with_loras(it)
                result = generate(cp, it, Path(opts.out))
                image = result.images[0]
                spec, provenance = pipes.cache.recorded(it.spec, result)  # hashes of the bytes loaded, params in effect
                path = save_png(image, Path(opts.out).resolve() / it.png, spec, cp.write_policy(opts.out), provenance)
                store.record_item(item_row(it, status="done", png=it.png, png_sha256=file_sha256(path), width=image.width,
                                           height=image.height, seconds=round(result.seconds, 4), unet_calls=result.unet_calls,
                                           unet_rows=result.unet_rows, error=None, run_id=summary.run_id,
                                           process_index=dist.index))
                summary.generated += 1
                summary.generation_seconds += result.seconds
            except Exception as err:  # recorded, and the run goes on
                tb = traceback.format_exc(limit=3)
                log.warning("%s failed: %s", it.item_id, err)
                store.record_item(item_row(it, status="failed", error=f"{type(err).__name__}: {err}\n{tb}",
                                           seconds=round(time.perf_counter() - t0, 4), run_id=summary.run_id,
                                           process_index=dist.index))
                summary.failed += 1
                bar.set_postfix(failed=summary.failed)
            bar.update(1)
    finally:
        kept.close()
        bar.close()


def spec_of(row: dict) -> GenerationSpec:
    import json

    return GenerationSpec.from_dict(json.loads(row["spec"]))
