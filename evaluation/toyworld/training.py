"""Shared training machinery: deterministic per-step randomness, resumable checkpoints, EMA, the one training
loop every stage runs (`TrainingLoop`), progress, timings.

Every random draw of step `k` of a stage comes from generators seeded by (stage seed, k), so a run resumed
from a checkpoint draws exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def quiet_library_bars() -> None:
    """Silence the libraries' own progress bars (transformers' "Loading weights" / "Writing model shards",
    diffusers' "Loading pipeline components"), for `--no-progress`. Also sets `HF_HUB_DISABLE_PROGRESS_BARS`, which
    processes spawned afterwards read when they import transformers; diffusers has no such variable, so worker
    processes call this themselves."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 7]).generate_state(1)[0]))


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, final: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `final * base`."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class EMA:
    """Exponential moving average of parameters (decay warms up as (1 + k) / (10 + k))."""

    def __init__(self, params, decay: float):
        self.params = [p for p in params]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
        self.updates = state["updates"]


class Checkpoint:
    """One resumable training state in `<work>/<stage>/checkpoint.pt` (written atomically)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "checkpoint.pt"

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict:
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class ParamList:
    """A list of parameters as one checkpointable part (the LoRA stage saves only its trainable tensors)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params

    def state_dict(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def load_state_dict(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self.params, values):
            p.data.copy_(v)


# What a stage computes at step k: its metrics as tensors, "loss" (what is minimised) among them.
StepFn = Callable[[int], dict[str, torch.Tensor]]


@dataclass
class TrainingLoop:
    """The resumable loop every toy-world stage trains with: resume from the checkpoint in `folder`, then per step
    the stage's loss, the `cosine_lr` rate (linear warm-up, cosine decay), backward, gradients averaged across
    processes (`average_gradients`), clipped, the optimiser's step and the EMA's; a tqdm bar; a checkpoint every
    `checkpoint_every` steps and after the last one.

    The loop draws no random numbers itself: a stage's step function draws all of step k's from generators seeded
    by (stage seed, k), so a resumed run equals an uninterrupted one bit for bit.
    """

    name: str  # the progress bar's label
    folder: Path  # where checkpoint.pt is kept
    steps: int
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # the trained parameters (their gradients are averaged and clipped)
    saved: dict  # the checkpoint's parts by key (optimiser included), each with state_dict()/load_state_dict()
    lr: float
    warmup: int
    final_lr: float = 0.1  # the cosine's floor as a share of lr
    checkpoint_every: int = 100
    clip_norm: float | None = 1.0
    ema: EMA | None = None
    rank: int = 0
    world: int = 1
    shown: str = "loss"  # the metric the bar shows
    digits: int = 4
    position: int | None = None  # the bar's line (side-by-side LoRA processes)

    def resume(self) -> int:
        """Load the checkpoint into the saved parts; the step to continue from (0 without a checkpoint)."""
        ckpt = Checkpoint(self.folder)
        if not ckpt.exists():
            return 0
        state = ckpt.load()
        for key, part in self.saved.items():
            part.load_state_dict(state[key])
        return state["step"]

    def save(self, done: int) -> None:
        Checkpoint(self.folder).save({"step": done, **{key: part.state_dict() for key, part in self.saved.items()}})

    def descend(self, step: int, loss: torch.Tensor) -> None:
        """One optimiser step on `loss` at step `step`'s learning rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(step, self.steps, self.lr, self.warmup, self.final_lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.params, self.world)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()

    def checkpoint(self, done: int) -> None:
        """Save after every `checkpoint_every` steps and after the last (rank 0 writes, the others wait for it)."""
        periodic = done % self.checkpoint_every == 0
        if self.rank == 0 and (periodic or done == self.steps):
            self.save(done)
        if periodic:
            barrier(self.world)

    def run(self, step_fn: StepFn, progress: bool = True) -> None:
        start = self.resume()
        bar = tqdm(total=self.steps, initial=start, desc=self.name, disable=not (progress and self.rank == 0),
                   position=self.position, dynamic_ncols=True, mininterval=2.0)
        for step in range(start, self.steps):
            metrics = step_fn(step)
            self.descend(step, metrics["loss"])
            bar.update(1)
            bar.set_postfix({self.shown: f"{metrics[self.shown].item():.{self.digits}f}"})
            self.checkpoint(step + 1)
        bar.close()
        barrier(self.world)


class Timings:
    """Wall time of each stage, one JSON file per stage in `<work>/timings/` (jobs run in parallel processes)."""

    def __init__(self, work: Path):
        self.folder = Path(work) / "timings"

    def read(self) -> dict:
        if not self.folder.exists():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))}

    def add(self, stage: str, seconds: float, **extra) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{stage}.json"
        entry = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0, "sessions": 0}
        entry["seconds"] = round(entry["seconds"] + seconds, 1)
        entry["sessions"] += 1
        entry.update(extra)
        path.write_text(json.dumps(entry, indent=2) + "\n")

    @contextmanager
    def measure(self, stage: str, **extra):
        """Times the block: wall seconds, CPU seconds of this process and of its finished child processes (what the
        stage would take uncontended is about cpu / processes), and the 1-minute load average at the end."""
        start, cpu0 = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
            data = self.read().get(stage, {})
            cpu = round(data.get("cpu_seconds", 0.0) + _cpu_seconds() - cpu0, 1)
            self.add(stage, time.perf_counter() - start, cpu_seconds=cpu, load_end=load, **extra)


def _cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def done_marker(folder: Path) -> Path:
    return Path(folder) / "DONE"


def is_done(folder: Path) -> bool:
    return done_marker(folder).exists()


def mark_done(folder: Path, info: dict | None = None) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    done_marker(folder).write_text(json.dumps(info or {}, indent=2) + "\n")


# --- two (or more) single-threaded processes ---------------------------------------------------------------
# On this 2-core machine one process with 2 threads is barely faster than one with 1 thread for these tiny
# models, and collapses (10x slower) when any other job takes a core; N one-thread processes degrade gracefully.
def launch(fn, world: int, args: tuple, init_file: Path) -> None:
    """Run `fn(rank, world, *args)` in `world` one-thread processes joined by a gloo process group."""
    if world <= 1:
        fn(0, 1, *args)
        return
    import torch.multiprocessing as mp

    init_file = Path(init_file)
    init_file.parent.mkdir(parents=True, exist_ok=True)
    init_file.unlink(missing_ok=True)
    mp.spawn(_entry, args=(fn, world, str(init_file.resolve()), args), nprocs=world, join=True)
    init_file.unlink(missing_ok=True)


def _entry(rank: int, fn, world: int, init_file: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def average_gradients(params, world: int) -> None:
    """All-reduce the gradients of `params` (one flat buffer) and divide by the number of processes."""
    if world <= 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
