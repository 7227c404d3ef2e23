"""What the routes work with (teacher, engine, batcher, jobs, production), started with the app and stopped with it."""
from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from shared.config import Settings, resolve_device
from shared.errors import DfkdError
from shared.ensemble import Ensemble, hook_free_copy
from shared.teacher import Teacher, TeacherCard, load_teacher
from synth_service.batcher import Batcher
from synth_service.class_pool import ClassPool
from synth_service.jobs import JobManager
from synth_service.metrics import SynthMetrics
from synth_service.production import ProductionController
from synth_service.result import SynthResult
from synth_service.student_feedback import StudentFeedback
from synth_service.synthesizer import Synthesizer, create_synthesizer


@dataclass
class Service:
    settings: Settings
    teacher: Teacher
    engine: Synthesizer
    batcher: Batcher
    jobs: JobManager
    production: ProductionController
    metrics: SynthMetrics
    pool: ClassPool | None = None


def _log(message: str) -> None:
    print(f"synth: {message}", flush=True)


def job_bytes_per_image(card: TeacherCard) -> int:
    """A finished job's memory per image: uint8 pixels, fp32 logits, and the per-image label, teacher and verifier
    figures."""
    return card.in_chans * card.image_size ** 2 + 4 * card.num_classes + 32


def filler_sink(destination: str, production: ProductionController, pool: ClassPool | None):
    """Where a batch's filler images go: the stream when it takes them, else the pool, else nowhere."""
    def sink(result: SynthResult, default_schedule: bool) -> str:
        if not default_schedule or destination == "drop":
            return "dropped"  # made at a request's own iterations: not what the stream and the pool promise
        if destination == "auto" and production.take_filler(result):
            return "stream"
        if pool is not None and pool.put(result):
            return "pool"
        return "dropped"
    return sink


def stream_ensemble(settings: Settings, teacher: Teacher, device) -> Ensemble | None:
    """The models whose logits ship with stream batches: a hook-free copy of the teacher plus `ensemble`. Members
    are checked even without a stream, so a bad list fails at start-up."""
    streaming = settings.stream.redis_url is not None and settings.stream.include_logits
    primary = hook_free_copy(teacher) if streaming else teacher
    members = Ensemble.load(primary, settings.ensemble)
    return members.to(device) if streaming else None


def service_lifespan(settings: Settings, teacher: Teacher | None):
    """Loads the teacher and starts the workers when the server starts (not when the app is built, so building one
    for its OpenAPI document costs nothing); stops them on shutdown."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if teacher is None and settings.teacher is None:
            raise DfkdError("no teacher: set `teacher` (a card path) in the config or DFKD_TEACHER")
        cfg = settings.service
        metrics: SynthMetrics = app.state.metrics
        t = teacher or load_teacher(settings.teacher)
        device = resolve_device(settings.device)
        # Made before the engine hooks the teacher: the publisher thread runs its own copy.
        ensemble = stream_ensemble(settings, t, device)
        feedback_on = settings.feedback.enabled and settings.stream.redis_url is not None
        engine = create_synthesizer(t, settings.synth, device=device,
                                    student_optional=feedback_on, log=_log)
        metrics.method.labels(engine.method).set(1)
        feedback = None
        if feedback_on:
            feedback = StudentFeedback(settings, t.card, metrics, device=engine.device, log=_log,
                                       on_student=lambda model, card: engine.set_student(model, card.model_dump()))
        production = ProductionController(settings, t.card, metrics, ensemble)
        pool = ClassPool(cfg.pool, t.card, metrics, log=_log) if cfg.pool.enabled else None
        max_batch = cfg.max_batch or settings.synth.batch_size
        fills = [production.fill_source()] + ([pool.refill_source()] if pool is not None else [])
        batcher = Batcher(engine, metrics, max_batch, cfg.max_wait_ms / 1000, cfg.max_queue_images, fills=fills,
                          min_fill=max_batch if cfg.min_batch_fill is None else cfg.min_batch_fill,
                          filler_sink=filler_sink(cfg.filler_destination, production, pool))
        production.on_capacity = batcher.wake
        batcher.start()
        production.start()
        if feedback is not None:
            feedback.start()
        jobs = JobManager(batcher, cfg.job_retention, cfg.job_ttl_s, t.card.class_names,
                          retention_bytes=cfg.job_retention_bytes, bytes_per_image=job_bytes_per_image(t.card))
        app.state.service = Service(settings, t, engine, batcher, jobs, production, metrics, pool)
        try:
            yield
        finally:
            await jobs.shutdown()
            if feedback is not None:
                feedback.stop()
            production.stop()
            batcher.stop()
            if pool is not None:
                pool.close()
            engine.close()  # a method with state (the generator) saves it here

    return lifespan
