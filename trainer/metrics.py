"""Prometheus metrics of the trainer (docs/architecture.md §7), served on `train.metrics_port` when set."""
from __future__ import annotations

import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from shared.student_metrics import StudentGauges

PREFIX = "dfkd_trainer"


class TrainerMetrics:
    def __init__(self, port: int | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.images = Counter(f"{PREFIX}_images_consumed", "Images trained on", registry=r)
        self.steps = Counter(f"{PREFIX}_steps", "Optimisation steps", registry=r)
        self.step_duration = Histogram(f"{PREFIX}_step_duration_seconds", "Wall time between steps",
                                       buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.loss = Gauge(f"{PREFIX}_loss", "Loss terms at the last logged step (every train.log_every)", ["term"],
                          registry=r)
        self.stage = Gauge(f"{PREFIX}_stage", "DearKD stage (1: distillation, 2: labels only)", registry=r)
        self.eval_top1 = Gauge(f"{PREFIX}_eval_top1", "Top-1 on the held-out real set", registry=r)
        self.store_batches = Gauge(f"{PREFIX}_store_batches", "Batches in the durable store", registry=r)
        self.starved = Counter(f"{PREFIX}_starved_seconds", "Seconds spent waiting for synthetic data", registry=r)
        self.stored = Counter(f"{PREFIX}_stream_batches_stored", "Stream batches written to the store", registry=r)
        self.duplicates = Counter(f"{PREFIX}_stream_duplicates", "Stream batches already stored", registry=r)
        self.dead_lettered = Counter(f"{PREFIX}_dead_lettered", "Stream entries sent to the dead-letter stream",
                                     registry=r)
        self.conflicts = Counter(f"{PREFIX}_stream_conflicts", "Batches whose id was stored already with other "
                                 "content (dead-lettered; the first copy is kept)", registry=r)
        self.quarantined = Counter(f"{PREFIX}_store_quarantined", "Stored batches moved aside on open "
                                   "(unreadable, or outside the teacher's contract)", registry=r)
        # The student fed back to the synthesis service (feedback.enabled).
        self.student = StudentGauges(PREFIX, r, "the last student published for the service")
        self.student_publish_failures = Counter(f"{PREFIX}_student_publish_failures",
                                                "Student publications that failed (Redis down, too large)",
                                                registry=r)
        self._last_step: float | None = None
        self.starved_total = 0.0
        if port is not None:
            start_http_server(port, registry=r)

    def consumed(self, result) -> None:
        self.stored.inc(result.stored)
        self.duplicates.inc(result.duplicates)
        self.dead_lettered.inc(result.dead_lettered)
        self.conflicts.inc(result.conflicts)

    def step(self, terms: dict, images: int, store) -> None:
        """Per-step counters, from host values only: the loss tensors are left alone (see `losses`)."""
        now = time.perf_counter()
        if self._last_step is not None:
            self.step_duration.observe(now - self._last_step)
        self._last_step = now
        self.images.inc(images)
        self.steps.inc()
        self.stage.set(terms["stage"])
        self.store_batches.set(len(store))

    def losses(self, terms: dict) -> dict[str, float]:
        """The loss terms as floats, also set on the gauges. Reading a device tensor waits for the device to finish
        the step, so this takes one copy for all terms and is called every `train.log_every` steps, not every step."""
        names = [k for k in terms if k != "stage"]
        if not names:
            return {}
        values = dict(zip(names, torch.stack([torch.as_tensor(terms[k]).float() for k in names]).tolist()))
        for k, v in values.items():
            self.loss.labels(k).set(v)
        return values

    def starve(self, seconds: float) -> None:
        self.starved_total += seconds
        self.starved.inc(seconds)

    def starved_seconds(self) -> float:
        return self.starved_total
