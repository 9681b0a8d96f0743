"""Per-step previews while a generation runs: the pipeline runs in a worker thread; its step callback decodes
the current latents and hands them over a queue to the caller, who yields them (a Gradio generator)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loraloom.pipelines.spec import GenerationSpec

from .service import GenerationResult, GenerationService


@dataclass
class StepEvent:
    step: int  # steps done
    total: int  # steps asked for (some schedulers take more model evaluations; `step` is capped at it)
    preview: Any = None  # PIL image of the current latents, or None between previews


def stream_generation(service: GenerationService, spec: GenerationSpec, preview_every: int = 1,
                      min_interval: float = 0.0, owner: str | None = None) -> Iterator[StepEvent | GenerationResult]:
    """Yield a StepEvent per denoising step, then the GenerationResult; errors of the run are raised here.

    `preview_every`: decode the latents into a preview every N steps (0: never). `min_interval`: skip the events
    (and their previews) of steps that end sooner than this many seconds after the last event sent, so a fast
    model is not slowed down by its own progress reports; the first and the last step are always sent.

    Closing the iterator early (the user pressed Stop, the client went away) stops the run after its current
    step and waits for it, so the model is free again when this returns. `owner`: the page session asking (only it
    may stop the run with `GenerationService.interrupt`).
    """
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    steps: list[int | None] = [spec.steps]  # unset: the model family's, known once the model is loaded

    last: list[float | None] = [None]  # no event sent yet: the first step is always sent (the clock's zero is arbitrary)

    def on_step(cp, i, t, kwargs):
        now = time.perf_counter()
        total = max(int(cp.arch.default_steps if steps[0] is None else steps[0]), 1)
        final = i + 1 >= total
        if not final and last[0] is not None and now - last[0] < min_interval:
            return
        last[0] = now
        preview = None
        if preview_every and ((i + 1) % preview_every == 0 or final):
            preview = cp.decode_latents(kwargs["latents"])[0]
        events.put(StepEvent(min(i + 1, total), total, preview))

    def work():
        try:
            events.put(service.generate(spec, callback=on_step, cancel=cancel, owner=owner))
        except BaseException as err:  # handed to the consumer, which raises it in its own thread
            events.put(err)

    worker = threading.Thread(target=work, name="loraloom-generate", daemon=True)
    worker.start()
    try:
        while True:
            item = events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, GenerationResult):
                return
    finally:
        if worker.is_alive():
            cancel.set()
            worker.join()
