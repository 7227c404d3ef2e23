"""FastAPI app factory: the engine, batcher, jobs and stream production behind one HTTP API.

See docs/architecture.md §6.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.config import Settings, resolve_device
from shared.errors import DfkdError, InvalidRequestError
from shared.teacher import Teacher, load_teacher
from synth_service.batcher import Batcher, QueueFullError
from synth_service.encode import MEDIA_TYPES, encode_result
from synth_service.http_guards import BodyLimit, TokenGuard, summarised_validation_errors
from synth_service.engine import InversionEngine, SynthResult, plan_batches
from synth_service.jobs import JobGone, JobManager, JobNotFound
from synth_service.metrics import SynthMetrics
from synth_service.production import ProductionController
from synth_service.schemas import (
    ClassInfo,
    ClassList,
    ErrorBody,
    Health,
    ImageRequest,
    JobRequest,
    JobStatus,
    ProductionStatus,
    ProductionUpdate,
    Readiness,
    ServiceInfo,
    TeacherInfo,
)

ERRORS = {401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
          413: {"model": ErrorBody, "description": "request body over service.max_body_bytes"},
          422: {"description": "invalid request"},
          429: {"model": ErrorBody, "description": "over capacity; see Retry-After"}}
GONE = {404: {"model": ErrorBody, "description": "no such job"},
        410: {"model": ErrorBody, "description": "the job's result was evicted (retention budget or age)"}}
BINARY = {"content": {"image/png": {}, "application/zip": {}, "application/octet-stream": {}},
          "description": "PNG (one image or a grid), zip of PNGs, or npz"}


@dataclass
class Service:
    settings: Settings
    teacher: Teacher
    engine: InversionEngine
    batcher: Batcher
    jobs: JobManager
    production: ProductionController
    metrics: SynthMetrics


def _unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


def create_app(settings: Settings, teacher: Teacher | None = None) -> FastAPI:
    """Build the service. The teacher is loaded from `settings.teacher` unless given."""
    metrics = SynthMetrics()
    cfg = settings.service
    # An empty token (e.g. an unset compose variable) means no auth, not "the empty string is the password".
    token = (cfg.auth_token.get_secret_value() if cfg.auth_token else "") or None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if teacher is None and settings.teacher is None:
            raise DfkdError("no teacher: set `teacher` (a card path) in the config or DFKD_TEACHER")
        t = teacher or load_teacher(settings.teacher)
        device = resolve_device(settings.device)
        engine = InversionEngine(t, settings.synth, device=device)
        max_batch = cfg.max_batch or settings.synth.batch_size
        production = ProductionController(settings, t.card, metrics)
        batcher = Batcher(engine, metrics, max_batch, cfg.max_wait_ms / 1000, cfg.max_queue_images,
                          fill=production.fill_source())
        production.on_capacity = batcher.wake
        batcher.start()
        production.start()
        app.state.service = Service(settings, t, engine, batcher,
                                    JobManager(batcher, cfg.job_retention, cfg.job_ttl_s, t.card.class_names,
                                               retention_bytes=cfg.job_retention_bytes,
                                               bytes_per_image=job_bytes_per_image(t.card)),
                                    production, metrics)
        try:
            yield
        finally:
            await app.state.service.jobs.shutdown()
            production.stop()
            batcher.stop()
            engine.close()

    app = FastAPI(title="dfkd synthesis service", version="1",
                  description="Synthetic images of any class from a teacher network (DeepInversion + BPID), "
                              "on demand over HTTP and continuously into a Redis stream.",
                  lifespan=lifespan)

    def service(request: Request) -> Service:
        return request.app.state.service

    # Added innermost first: the metrics middleware below wraps both, so 401s and 413s are counted too.
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    if token is not None:
        app.add_middleware(TokenGuard, token=token, open_paths=open_paths(app, cfg))
    app.add_exception_handler(RequestValidationError, summarised_validation_errors)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = route.path if route is not None else "unmatched"
        metrics.http_requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.http_latency.labels(path, request.method).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError):
        return JSONResponse({"detail": str(exc)}, status_code=429,
                            headers={"Retry-After": str(int(max(1, round(exc.retry_after_s))))})

    @app.exception_handler(InvalidRequestError)
    async def invalid(request: Request, exc: InvalidRequestError):
        return JSONResponse({"detail": [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]}, status_code=422)

    @app.exception_handler(JobNotFound)
    async def not_found(request: Request, exc: JobNotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(JobGone)
    async def gone(request: Request, exc: JobGone):
        return JSONResponse({"detail": str(exc)}, status_code=410)

    def check_request(svc: Service, req: ImageRequest, max_images: int) -> list[int]:
        k = svc.teacher.card.num_classes
        bad = sorted({c for c in req.class_ids if not 0 <= c < k})
        if bad:
            raise _unprocessable("class_ids", f"unknown class id(s) {bad[:10]}: valid ids are 0..{k - 1}")
        total = len(req.class_ids) * req.per_class
        if total > max_images:
            raise _unprocessable("per_class", f"{total} images requested; this endpoint serves at most "
                                              f"{max_images} (use POST /v1/jobs for more)")
        if req.iterations is not None and req.iterations > cfg.max_iterations:
            raise _unprocessable("iterations", f"iterations must be <= {cfg.max_iterations}")
        return [c for c in req.class_ids for _ in range(req.per_class)]

    # -- images -----------------------------------------------------------------------------------------------------
    @app.post("/v1/images", tags=["images"],
              responses={200: BINARY, **ERRORS, 504: {"model": ErrorBody, "description": "timed out"}},
              response_class=Response)
    async def create_images(req: ImageRequest, svc: Service = Depends(service)) -> Response:
        """Synthesize a few images synchronously. They are coalesced with other requests into full batches."""
        labels = check_request(svc, req, min(cfg.sync_max_images, svc.batcher.max_batch))
        seed = req.seed if req.seed is not None else int(time.time_ns() % (2**31))
        future = svc.batcher.submit(labels, req.iterations, seed)
        try:
            result: SynthResult = await asyncio.wait_for(asyncio.wrap_future(future), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise HTTPException(504, detail=f"not done within {cfg.request_timeout_s:.0f}s") from None
        body = await asyncio.to_thread(encode_result, result, req.format, svc.teacher.card.class_names)
        return Response(body, media_type=MEDIA_TYPES[req.format], headers={
            "X-Image-Count": str(len(labels)), "X-Labels": ",".join(map(str, result.labels.tolist())),
            "X-Teacher-Top1": f"{float((result.teacher_top1 == result.labels).float().mean()):.4f}"})

    # -- jobs -------------------------------------------------------------------------------------------------------
    @app.post("/v1/jobs", tags=["jobs"], status_code=202, responses=ERRORS)
    async def create_job(req: JobRequest, svc: Service = Depends(service)) -> JobStatus:
        """Queue a large request; poll its status and fetch the result when done."""
        check_request(svc, req, cfg.job_max_images)
        plan_batches(req.class_ids, req.per_class, svc.batcher.max_batch)
        return svc.jobs.create(req, req.iterations).status()

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], responses={**GONE, **ERRORS})
    async def job_status(job_id: str, svc: Service = Depends(service)) -> JobStatus:
        return svc.jobs.get(job_id).status()

    @app.get("/v1/jobs/{job_id}/result", tags=["jobs"], response_class=Response,
             responses={200: BINARY, **GONE, 409: {"model": ErrorBody, "description": "not done yet"}, **ERRORS})
    async def job_result(job_id: str, svc: Service = Depends(service)) -> Response:
        job = svc.jobs.get(job_id)
        if job.state != "done":
            raise HTTPException(409, detail=f"job is {job.state}" + (f": {job.error}" if job.error else ""))
        body = await asyncio.to_thread(svc.jobs.result_bytes, job)
        return Response(body, media_type=MEDIA_TYPES[job.request.format])

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], responses={**GONE, **ERRORS})
    async def delete_job(job_id: str, svc: Service = Depends(service)) -> JobStatus:
        """Cancel a running job, or drop a finished one."""
        return svc.jobs.delete(job_id).status()

    # -- metadata ---------------------------------------------------------------------------------------------------
    @app.get("/v1/classes", tags=["metadata"], responses=ERRORS)
    async def classes(svc: Service = Depends(service)) -> ClassList:
        return ClassList(classes=[ClassInfo(id=i, name=n) for i, n in enumerate(svc.teacher.card.class_names)])

    @app.get("/v1/info", tags=["metadata"], responses=ERRORS)
    async def info(svc: Service = Depends(service)) -> ServiceInfo:
        c = svc.teacher.card
        return ServiceInfo(
            teacher=TeacherInfo(name=c.name, arch=c.arch, num_classes=c.num_classes, in_chans=c.in_chans,
                                image_size=c.image_size, mean=list(c.mean), std=list(c.std),
                                fingerprint=c.fingerprint, metrics=c.metrics),
            synthesis_defaults=svc.settings.synth.model_dump(mode="json"),
            limits={"max_batch": svc.batcher.max_batch, "sync_max_images": cfg.sync_max_images,
                    "job_max_images": cfg.job_max_images, "max_iterations": cfg.max_iterations,
                    "max_queue_images": cfg.max_queue_images, "max_wait_ms": cfg.max_wait_ms,
                    "max_body_bytes": cfg.max_body_bytes, "job_retention_bytes": cfg.job_retention_bytes},
            device=str(svc.engine.device))

    # -- background production --------------------------------------------------------------------------------------
    @app.get("/v1/production", tags=["production"], responses=ERRORS)
    async def production_status(svc: Service = Depends(service)) -> ProductionStatus:
        return svc.production.status()

    @app.put("/v1/production", tags=["production"],
             responses={409: {"model": ErrorBody, "description": "no Redis stream configured"}, **ERRORS})
    async def production_update(update: ProductionUpdate, svc: Service = Depends(service)) -> ProductionStatus:
        """Start or stop continuous production into the Redis stream, and set the class policy."""
        if update.enabled and svc.settings.stream.redis_url is None:
            raise HTTPException(409, detail="no Redis stream configured (stream.redis_url)")
        k = svc.teacher.card.num_classes
        if update.classes is not None and any(not 0 <= c < k for c in update.classes):
            raise _unprocessable("classes", f"class ids must be in 0..{k - 1}")
        per_class = update.per_class if update.per_class is not None else svc.production.per_class
        if per_class > svc.batcher.max_batch:
            raise _unprocessable("per_class", f"per_class {per_class} is larger than an engine batch "
                                              f"({svc.batcher.max_batch} images): production deals whole per-class "
                                              "groups into batches, so none would ever fit")
        svc.production.update(update)
        svc.batcher.wake()
        return svc.production.status()

    # -- operations -------------------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Health:
        """The process is up (no auth)."""
        return Health(status="ok")

    @app.get("/readyz", tags=["operations"], responses={503: {"model": Readiness}})
    async def readyz(request: Request) -> Readiness:
        """Teacher loaded and, when a stream is configured, Redis reachable."""
        svc: Service | None = getattr(request.app.state, "service", None)
        redis = "not configured" if settings.stream.redis_url is None else (
            "ok" if svc is not None and svc.production.redis_ok else "unavailable")
        body = Readiness(ready=svc is not None and redis != "unavailable", teacher_loaded=svc is not None,
                         redis=redis, queue_images=svc.batcher.queued_images if svc else 0)
        if not body.ready:
            return JSONResponse(body.model_dump(), status_code=503)
        return body

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}, 401: ERRORS[401]})
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def job_bytes_per_image(card) -> int:
    """A finished job's memory per image: uint8 pixels, fp32 logits, and the per-image label and teacher figures."""
    return card.in_chans * card.image_size ** 2 + 4 * card.num_classes + 24


def open_paths(app: FastAPI, cfg) -> set[str]:
    """The paths served without the token when one is set: /healthz, and what the config opens on purpose."""
    paths = {"/healthz"}
    if cfg.docs_open:
        paths |= {p for p in (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url) if p}
    if not cfg.metrics_auth:
        paths.add("/metrics")
    return paths
