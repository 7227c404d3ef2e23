"""The fed-back student's step, publication time and age as Prometheus gauges, the same on both sides of the channel:
the trainer shows what it published, the service what it loaded."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Gauge


class StudentGauges:
    def __init__(self, prefix: str, registry: CollectorRegistry, subject: str):
        self.step = Gauge(f"{prefix}_student_step", f"Trainer step of {subject} (-1: none)", registry=registry)
        self.published = Gauge(f"{prefix}_student_published_timestamp_seconds",
                               f"When {subject} was published (Unix time; 0: none)", registry=registry)
        self.age = Gauge(f"{prefix}_student_age_seconds", f"Seconds since {subject} was published (-1: none)",
                         registry=registry)
        self._published_at = 0.0
        self.age.set_function(lambda: time.time() - self._published_at if self._published_at else -1.0)
        self.step.set(-1)

    def set(self, step: int, published_at: float) -> None:
        self._published_at = published_at
        self.step.set(step)
        self.published.set(published_at)
