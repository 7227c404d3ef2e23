"""Background production into the Redis stream: class policy, backpressure, and a publisher that never drops a batch.

The engine worker asks `active()` (no I/O) whether to fill spare batch slots; a publisher thread owns every Redis
call, so an outage pauses production while the HTTP API keeps serving.
"""
from __future__ import annotations

import os
import re
import queue
import threading
import time
import uuid
from typing import Callable

import redis

from shared.config import Settings
from shared.ensemble import Ensemble
from shared.teacher import TeacherCard
from shared.stream import StreamProducer, StreamUnavailableError, connect_redis
from shared.wire import LOGIT_VIEWS, SynthesisRecord, WireBatch
from synth_service.batcher import FillSource
from synth_service.result import SynthResult
from synth_service.metrics import SynthMetrics
from synth_service.schemas import ProductionStatus, ProductionUpdate

PUBLISH_QUEUE = 2  # finished batches waiting for Redis; production pauses while it is full
REFRESH_S = 0.5


def wire_batch(result: SynthResult, card: TeacherCard, producer_id: str, sequence: int,
               synthesis: dict, ensemble: Ensemble | None) -> WireBatch:
    """The stream batch of `result`; with an ensemble, every member's logits on the delivered uint8 images, for
    each view in LOGIT_VIEWS (what the trainer's stored-logit path needs)."""
    stats = {"teacher_top1": float((result.teacher_top1 == result.labels).float().mean()),
             "teacher_confidence": float(result.teacher_confidence.mean()), "seconds": result.seconds,
             **{f"final_{k}": v for k, v in result.final_terms.items()}}
    logits = {}
    if ensemble is not None:
        started = time.perf_counter()
        logits = {"logits": ensemble.logits(result.images, LOGIT_VIEWS).half().numpy(),
                  "logit_members": ensemble.fingerprints, "logit_views": LOGIT_VIEWS}
        stats["logits_seconds"] = time.perf_counter() - started
    return WireBatch(
        batch_id=f"{producer_id}-{sequence}", sequence=sequence, producer_id=producer_id,
        teacher_fingerprint=card.fingerprint, mean=tuple(card.mean), std=tuple(card.std),
        labels=result.labels.tolist(), images=result.images.numpy(), **logits,
        synthesis=SynthesisRecord(params={**synthesis, "iterations": result.iterations}, seed=result.seed),
        stats=stats,
        created_at=time.time())


class ProductionController:
    def __init__(self, settings: Settings, card: TeacherCard, metrics: SynthMetrics, ensemble: Ensemble | None = None):
        """`ensemble`: the models whose logits ship with each batch (with `stream.include_logits`); its member 0
        must be a copy of the teacher that the engine does not use, since this runs on the publisher thread."""
        self.settings = settings
        self.ensemble = ensemble if settings.stream.include_logits else None
        self.stream_cfg = settings.stream
        self.card = card
        self.metrics = metrics
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", os.uname().nodename)[:40] or "host"
        self.producer_id = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.on_capacity: Callable[[], None] = lambda: None
        self.enabled = settings.service.production_enabled and self.stream_cfg.redis_url is not None
        self.classes: list[int] | None = None
        self.per_class = settings.service.production_per_class
        self.target_images: int | None = None
        self.images_produced = 0
        self.filler_published = 0  # filler images of request batches; they do not count towards target_images
        self.batches_published = 0
        self.redis_ok = False
        self.backlog: int | None = None
        self._reserved = 0  # images handed to the engine and not yet published
        self._cursor = 0
        self._sequence = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[SynthResult, bool]] = queue.Queue(maxsize=PUBLISH_QUEUE)  # (images, filler)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: StreamProducer | None = None
        if self.stream_cfg.redis_url is not None:
            client = connect_redis(self.stream_cfg.redis_url, connect_timeout_s=2.0, timeout_s=10.0)
            # A short retry budget per call: this thread's own loop keeps retrying and can still stop promptly.
            self._producer = StreamProducer(client, self.stream_cfg, self.producer_id, max_retry_s=1.0)

    # -- engine side (no I/O) ---------------------------------------------------------------------------------------
    def fill_source(self) -> FillSource:
        return FillSource(name="stream", active=self.active, next_labels=self.next_labels, deliver=self.deliver,
                          release=self.release)

    def paused_reason(self) -> str | None:
        if not self.enabled:
            return "disabled"
        return self._stream_blocked()

    def _stream_blocked(self) -> str | None:
        """Why the stream cannot take images now, production switched on or not (None: it can)."""
        if self.stream_cfg.redis_url is None:
            return "no stream configured"
        if not self.redis_ok:
            return "redis unavailable"
        if self.target_images is not None and self.images_produced + self._reserved >= self.target_images:
            return "target reached"
        if self._queue.full():
            return "publishing"
        if self.backlog is None or self.backlog >= self.stream_cfg.max_backlog:
            return "backlog full"
        return None

    def active(self) -> bool:
        return self.paused_reason() is None

    def next_labels(self, space: int) -> list[int]:
        with self._lock:
            if not self.active():
                return []
            groups = space // self.per_class
            if self.target_images is not None:
                left = self.target_images - self.images_produced - self._reserved
                groups = min(groups, left // self.per_class + (1 if left % self.per_class else 0))
            classes = self.classes or list(range(self.card.num_classes))
            labels = []
            for _ in range(max(0, groups)):
                labels += [classes[self._cursor % len(classes)]] * self.per_class
                self._cursor += 1
            if self.target_images is not None:
                labels = labels[: self.target_images - self.images_produced - self._reserved]
            self._reserved += len(labels)
            return labels

    def release(self, labels: list[int]) -> None:
        """Labels dealt to a batch that failed: no longer on their way."""
        with self._lock:
            self._reserved -= len(labels)

    def deliver(self, result: SynthResult) -> None:
        self._queue.put((result, False))  # blocks rather than drops; active() keeps this rare

    def take_filler(self, result: SynthResult) -> bool:
        """Queue a request batch's filler images for the stream when it has room (production need not be on);
        False: not taken, the caller keeps them."""
        # The stream carries only the classes production is set to, and stops at its target.
        if self.classes is not None or self._stream_blocked() is not None:
            return False
        try:
            self._queue.put_nowait((result, True))
        except queue.Full:
            return False
        return True

    # -- control ----------------------------------------------------------------------------------------------------
    def update(self, update: ProductionUpdate) -> None:
        with self._lock:
            self.enabled = update.enabled
            if update.classes is not None or update.enabled:
                self.classes = update.classes
            if update.per_class is not None:
                self.per_class = update.per_class
            self.target_images = None if update.target_images is None else self.images_produced + update.target_images

    def status(self) -> ProductionStatus:
        return ProductionStatus(
            enabled=self.enabled, classes=self.classes, per_class=self.per_class, target_images=self.target_images,
            images_produced=self.images_produced, filler_published=self.filler_published,
            batches_published=self.batches_published,
            pending_publish=self._queue.qsize(),
            stream=self.stream_cfg.key("batches") if self._producer else None, backlog=self.backlog,
            max_backlog=self.stream_cfg.max_backlog if self._producer else None, redis_ok=self.redis_ok,
            paused_reason=self.paused_reason())

    # -- publisher thread -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._producer is None:
            return
        self._thread = threading.Thread(target=self._run, name="stream-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _refresh(self) -> None:
        was_active = self.active()
        try:
            self._producer.ensure_group()
            self.backlog = self._producer.backlog()
            self.redis_ok = True
        except (redis.RedisError, OSError, StreamUnavailableError):
            self.redis_ok = False
            self.metrics.stream_errors.inc()
        if self.backlog is not None:
            self.metrics.stream_backlog.set(self.backlog)
        if self.active() and not was_active:
            self.on_capacity()

    def _publish(self, result: SynthResult, filler: bool) -> None:
        """Retry until Redis takes the batch or the service stops: an acknowledged image is never dropped."""
        with self._lock:
            self._sequence += 1
            sequence = self._sequence
        batch = wire_batch(result, self.card, self.producer_id, sequence,
                           {"teacher": self.card.name, **self.settings.synth.model_dump(mode="json"),
                            "filler": filler, "ensemble": self.ensemble.names if self.ensemble else None},
                           self.ensemble)
        delay = self.stream_cfg.retry_initial_s
        while not self._stop.is_set():
            try:
                self._producer.publish(batch)
                break
            except (redis.RedisError, OSError, StreamUnavailableError):
                self.redis_ok = False
                self.metrics.stream_errors.inc()
                self._stop.wait(delay)
                delay = min(delay * 2, self.stream_cfg.retry_max_s)
        else:
            return
        n = len(result.labels)
        with self._lock:
            if filler:
                self.filler_published += n
            else:
                self._reserved -= n
                self.images_produced += n
            self.batches_published += 1
        self.metrics.stream_published.inc()

    def _run(self) -> None:
        last_refresh = 0.0
        while not self._stop.is_set():
            try:
                result, filler = self._queue.get(timeout=REFRESH_S)
            except queue.Empty:
                result = None
            if result is not None:
                self._publish(result, filler)
            if time.monotonic() - last_refresh >= REFRESH_S or result is not None:
                self._refresh()
                last_refresh = time.monotonic()
