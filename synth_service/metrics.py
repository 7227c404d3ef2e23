"""Prometheus metrics of the synthesis service (docs/architecture.md §7): one prefix, base units, no class-id labels."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from synth_service.result import SynthResult
from shared.student_metrics import StudentGauges
from synth_service.report import diversity_by_space

PREFIX = "dfkd_synth"
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_DIVERSITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 2.0)  # range [0, 2]


class SynthMetrics:
    """One registry per service instance, so several apps can live in one process (tests)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.images_generated = Counter(f"{PREFIX}_images_generated", "Images synthesized", ["destination"],
                                        registry=r)
        self.filler_images = Counter(f"{PREFIX}_filler_images", "Filler images that balanced a batch, by where "
                                     "they went (stream, pool, dropped)", ["destination"], registry=r)
        self.pool_images = Gauge(f"{PREFIX}_pool_images", "Images in the warm per-class pool", registry=r)
        self.pool_bytes = Gauge(f"{PREFIX}_pool_bytes", "Bytes the warm pool holds (service.pool.max_bytes caps it)",
                                registry=r)
        self.pool_requests = Counter(f"{PREFIX}_pool_requests", "Requests that asked for pool images, by outcome "
                                     "(hit: served from the pool; cold: synthesised instead)", ["result"],
                                     registry=r)
        self.batches = Counter(f"{PREFIX}_batches", "Engine batches run", registry=r)
        self.batch_fill = Histogram(f"{PREFIX}_batch_fill_ratio", "Images in a batch / max batch size",
                                    buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.batch_duration = Histogram(f"{PREFIX}_batch_duration_seconds", "Wall time of one engine batch",
                                        buckets=_DURATION_BUCKETS, registry=r)
        self.iteration_duration = Histogram(f"{PREFIX}_iteration_duration_seconds",
                                            "Mean wall time of one optimisation step in a batch",
                                            buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5), registry=r)
        self.loss = Gauge(f"{PREFIX}_final_loss", "Loss terms on the last batch's final images", ["term"], registry=r)
        self.teacher_confidence = Gauge(f"{PREFIX}_teacher_confidence",
                                        "Mean teacher probability of the target class, last batch", registry=r)
        self.teacher_top1 = Gauge(f"{PREFIX}_teacher_top1", "Teacher top-1 on the last batch", registry=r)
        # space: teacher (penultimate features, which BPID optimises), pixel (no model), verifier (synth.verifier)
        self.diversity = Gauge(f"{PREFIX}_intra_class_diversity",
                               "Mean intra-class pairwise distance of unit-length embeddings, last batch", ["space"],
                               registry=r)
        self.diversity_batches = Histogram(f"{PREFIX}_batch_intra_class_diversity",
                                           "Mean intra-class pairwise distance of unit-length embeddings per batch",
                                           ["space"], buckets=_DIVERSITY_BUCKETS, registry=r)
        self.verifier_top1 = Gauge(f"{PREFIX}_verifier_top1",
                                   "Verifier top-1 agreement with the target labels on the last batch", registry=r)
        self.method = Gauge(f"{PREFIX}_method_info", "The synthesis method in use (value 1)", ["method"], registry=r)
        self.warm = Gauge(f"{PREFIX}_method_warm", "1 once the method is ready to serve (0 while it warms up)",
                          registry=r)
        self.warmup_seconds = Gauge(f"{PREFIX}_method_warmup_seconds", "Wall time of the method's last warm-up",
                                    registry=r)
        # The student in the adversarial terms, fed back by the trainer (feedback.enabled).
        self.student = StudentGauges(PREFIX, r, "the student in the adversarial terms")
        self.student_loads = Counter(f"{PREFIX}_student_loads", "Students loaded from the feedback channel",
                                     registry=r)
        self.student_refused = Counter(f"{PREFIX}_student_refused",
                                       "Students refused from the feedback channel", ["reason"], registry=r)
        self.queue_images = Gauge(f"{PREFIX}_queue_images", "Images waiting for an engine batch", registry=r)
        self.stream_backlog = Gauge(f"{PREFIX}_stream_backlog_entries",
                                    "Stream entries not yet acknowledged by the trainers (lag + pending)", registry=r)
        self.stream_published = Counter(f"{PREFIX}_stream_batches_published", "Batches written to the stream",
                                        registry=r)
        self.stream_errors = Counter(f"{PREFIX}_stream_errors", "Failed attempts to reach Redis", registry=r)
        self.rejected = Counter(f"{PREFIX}_rejected_requests", "Requests refused for capacity", ["reason"],
                                registry=r)
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests", ["route", "method", "code"],
                                     registry=r)
        self.http_latency = Histogram(f"{PREFIX}_http_request_duration_seconds", "HTTP latency",
                                      ["route", "method"], buckets=_DURATION_BUCKETS, registry=r)

    def student_loaded(self, step: int, published_at: float) -> None:
        self.student.set(step, published_at)
        self.student_loads.inc()

    def record_quality(self, result: SynthResult) -> None:
        """Diversity per space and verifier agreement of one finished batch, from its final images and features."""
        for space, value in diversity_by_space(result).items():
            if value is not None:  # no class with 2 images in this batch
                self.diversity.labels(space).set(value)
                self.diversity_batches.labels(space).observe(value)
        if result.verifier_top1 is not None:
            self.verifier_top1.set(float((result.verifier_top1 == result.labels).float().mean()))
