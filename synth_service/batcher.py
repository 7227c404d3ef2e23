"""Batcher: one engine worker per process that coalesces requests and background work into full batches.

BN-statistics matching works on batch statistics, so a full, class-balanced batch is about quality as much as speed:
a lone 4-image request inverted by itself gives worse images than inside a full batch. What requests and background
work leave empty is topped up with class-balanced filler (filler.py), which goes to the stream, the pool, or nowhere.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from shared.errors import DfkdError, InvalidRequestError
from synth_service.filler import filler_labels
from synth_service.labels import check_class_ids
from synth_service.metrics import SynthMetrics
from synth_service.result import SynthResult
from synth_service.synthesizer import Synthesizer

# Lower runs first: synchronous HTTP requests, then job chunks; background production only fills what is left.
PRIORITY = {"http": 0, "job": 1}
IDLE_WAIT_S = 1.0  # longest sleep of a worker with nothing to run; any submit or wake() ends it sooner


class QueueFullError(DfkdError):
    """The queue holds as many images as allowed; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class WorkItem:
    labels: list[int]
    iterations: int | None
    init: torch.Tensor
    destination: str
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.monotonic)


@dataclass
class FillSource:
    """Background work for spare batch slots (stream production, pool refill). `active` must be cheap (no I/O): it
    is polled under the queue lock."""

    name: str  # the `destination` label of its images in the metrics
    active: Callable[[], bool]
    next_labels: Callable[[int], list[int]]  # labels for up to n free slots (may be empty)
    deliver: Callable[[SynthResult], None]  # receives the finished images
    release: Callable[[list[int]], None] = lambda labels: None  # dealt labels whose batch failed


# Takes a batch's filler images and whether they ran at the default schedule; returns where they went
# ("stream", "pool" or "dropped"), for the metrics.
FillerSink = Callable[[SynthResult, bool], str]


def request_noise(labels: Sequence[int], seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Starting noise of a request's images: the k-th image of class c draws from (seed, c, k), so it starts the same
    whatever else the request asked for."""
    seen: dict[int, int] = {}
    rows = []
    for c in labels:
        k = seen[c] = seen.get(c, -1) + 1
        mixed = ((seed * 1_000_003 + c) * 1_000_033 + k) % 2**63
        rows.append(torch.randn(shape, generator=torch.Generator().manual_seed(mixed)))
    return torch.stack(rows) if rows else torch.empty(0, *shape)


class Batcher:
    """Works through a `Synthesizer`, whatever its method: items share a batch when their `batch_key`s match."""

    def __init__(self, engine: Synthesizer, metrics: SynthMetrics, max_batch: int, max_wait_s: float,
                 max_queue_images: int, fills: Sequence[FillSource] = (), min_fill: int = 0,
                 filler_sink: FillerSink | None = None):
        """`fills` take spare slots of default-schedule batches, in order; then class-balanced filler tops every
        batch up to `min_fill` images and goes to `filler_sink` (None: dropped)."""
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.fills = list(fills)
        self.min_fill = min(min_fill, max_batch)
        self.filler_sink = filler_sink
        self._filler_cursor = 0
        self._queues: dict[str, deque[WorkItem]] = {d: deque() for d in PRIORITY}
        self._queued_images = 0
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._batch_ids = itertools.count()
        self._seconds_per_image = 1.0  # running estimate, for Retry-After
        self.batches_run = 0

    # -- client side ------------------------------------------------------------------------------------------------
    def submit(self, labels: list[int], iterations: int | None, seed: int, destination: str = "http") -> Future:
        """Queue images; the future resolves to their SynthResult. Raises QueueFullError when over capacity."""
        if destination not in PRIORITY:
            raise ValueError(f"unknown destination {destination!r}")
        if len(labels) > self.max_batch:
            raise InvalidRequestError(f"{len(labels)} images exceed the batch size {self.max_batch}; split them")
        # Checked here, not only by the engine: one bad id in a coalesced batch would fail every request in it.
        labels = check_class_ids(self.engine.card, labels)
        iterations = self.engine.request_iterations(iterations)
        c = self.engine.card
        item = WorkItem(labels, iterations, request_noise(labels, seed, (c.in_chans, c.image_size, c.image_size)),
                        destination)
        with self._cond:
            if not self._running:
                raise DfkdError("the batcher is not running")
            if self._queued_images + len(labels) > self.max_queue_images:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFullError(f"queue full ({self._queued_images} images waiting)", self.retry_after_s())
            self._queues[destination].append(item)
            self._queued_images += len(labels)
            self.metrics.queue_images.set(self._queued_images)
            self._cond.notify_all()
        return item.future

    def retry_after_s(self) -> float:
        """Roughly when the current queue will have drained."""
        return max(1.0, round(self._queued_images * self._seconds_per_image, 1))

    @property
    def queued_images(self) -> int:
        return self._queued_images

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            self._running = True
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for q in self._queues.values():
                while q:
                    q.popleft().future.set_exception(DfkdError("the service is shutting down"))
            self._queued_images = 0

    def wake(self) -> None:
        """Production was switched on, or the stream has room again."""
        with self._cond:
            self._cond.notify_all()

    # -- worker -----------------------------------------------------------------------------------------------------
    def _take(self, iterations: int | None, space: int, any_iterations: bool = False) -> WorkItem | None:
        """Pop the first queued item (by priority) that fits `space` and may share a batch run at `iterations`."""
        key = self.engine.batch_key(iterations)
        for dest in PRIORITY:
            q = self._queues[dest]
            for i, item in enumerate(q):
                if len(item.labels) <= space and (any_iterations or self.engine.batch_key(item.iterations) == key):
                    del q[i]
                    self._queued_images -= len(item.labels)
                    return item
        return None

    def _collect(self) -> tuple[list[WorkItem], int | None] | None:
        """Block until there is work, then gather compatible items until the batch is full or max_wait passed."""
        with self._cond:
            first = None
            while self._running:
                first = self._take(None, self.max_batch, any_iterations=True)
                if first is not None or self._fill_available():
                    break
                self._cond.wait(timeout=0.5)
            if not self._running:
                return None
            items = [first] if first is not None else []
            iterations = first.iterations if first is not None else None
            n = len(first.labels) if first is not None else 0
            deadline = (first.created if first is not None else time.monotonic()) + self.max_wait_s
            while self._running and n < self.max_batch:
                nxt = self._take(iterations, self.max_batch - n)
                if nxt is not None:
                    items.append(nxt)
                    n += len(nxt.labels)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not items:
                    break
                self._cond.wait(timeout=remaining)
            self.metrics.queue_images.set(self._queued_images)
            return items, iterations

    def _idle_wait(self) -> None:
        with self._cond:
            if self._running:
                self._cond.wait(timeout=IDLE_WAIT_S)

    def _fill_available(self) -> bool:
        return any(fill.active() for fill in self.fills)

    def _run(self) -> None:
        self._warm_up()
        while True:
            collected = self._collect()
            if collected is None:
                return
            items, iterations = collected
            n = sum(len(item.labels) for item in items)
            fills: list[tuple[FillSource, list[int]]] = []
            if self.engine.batch_key(iterations) == self.engine.batch_key(None):
                for fill in self.fills:
                    if n < self.max_batch and fill.active():
                        dealt = fill.next_labels(self.max_batch - n)
                        if dealt:
                            fills.append((fill, dealt))
                            n += len(dealt)
            if n == 0:
                self._idle_wait()  # a source is active but dealt nothing: block until woken, never spin
                continue
            self._run_batch(items, iterations, fills)

    def _warm_up(self) -> None:
        """A method with persistent state gets ready before the first batch; requests queue meanwhile."""
        try:
            seconds = self.engine.warm_up()
        except Exception:  # the first batch retries it and fails its requests with the reason
            return
        self.metrics.warmup_seconds.set(seconds)
        self.metrics.warm.set(1)

    def _run_batch(self, items: list[WorkItem], iterations: int | None,
                   fills: list[tuple[FillSource, list[int]]]) -> None:
        batch_id = next(self._batch_ids)
        c = self.engine.card
        labels = [x for item in items for x in item.labels] + [x for _, dealt in fills for x in dealt]
        filler = filler_labels(labels, self.min_fill - len(labels), c.num_classes, self._filler_cursor)
        self._filler_cursor = (self._filler_cursor + len(filler) // 2) % c.num_classes
        # Background images start from noise of their own seed, so a request's images do not depend on them.
        n_background = len(labels) + len(filler) - sum(len(item.labels) for item in items)
        background_init = torch.randn(n_background, c.in_chans, c.image_size, c.image_size,
                                      generator=torch.Generator().manual_seed(1_000_003 * batch_id + 17))
        labels += filler
        init = torch.cat([item.init for item in items] + [background_init])
        try:
            result = self.engine.synthesize(labels, seed=batch_id, iterations=iterations, init=init,
                                            return_logits=True)
        except Exception as exc:  # one bad batch must not kill the worker: fail its requests instead
            for item in items:
                item.future.set_exception(exc)
            for fill, dealt in fills:
                fill.release(dealt)
            return
        self.batches_run += 1
        self._record(result, len(labels))
        start = 0
        for item in items:
            part = result.select(start, start + len(item.labels))
            start += len(item.labels)
            self.metrics.images_generated.labels(item.destination).inc(len(item.labels))
            if not item.future.cancelled():
                item.future.set_result(part)
        for fill, dealt in fills:
            self.metrics.images_generated.labels(fill.name).inc(len(dealt))
            self._guarded(fill.name, fill.deliver, result.select(start, start + len(dealt)))
            start += len(dealt)
        if filler:
            self.metrics.images_generated.labels("filler").inc(len(filler))
            default = self.engine.batch_key(iterations) == self.engine.batch_key(None)
            went = "dropped"
            if self.filler_sink is not None:
                went = self._guarded("filler", self.filler_sink, result.select(start, len(labels)), default) \
                    or "dropped"
            self.metrics.filler_images.labels(went).inc(len(filler))

    @staticmethod
    def _guarded(what: str, deliver: Callable, *args):
        """A delivery that raises loses those images, said in the log, never the engine worker."""
        try:
            return deliver(*args)
        except Exception as exc:
            print(f"synth: delivering {what} images failed, they are lost: {exc!r}", flush=True)
            return None

    def _record(self, result: SynthResult, n: int) -> None:
        m = self.metrics
        m.batches.inc()
        m.batch_fill.observe(n / self.max_batch)
        m.batch_duration.observe(result.seconds)
        m.iteration_duration.observe(result.seconds / max(1, result.iterations))
        for term, value in result.final_terms.items():
            m.loss.labels(term).set(value)
        m.teacher_confidence.set(float(result.teacher_confidence.mean()))
        m.teacher_top1.set(float((result.teacher_top1 == result.labels).float().mean()))
        m.record_quality(result)
        self._seconds_per_image = 0.7 * self._seconds_per_image + 0.3 * (result.seconds / n)
