"""/healthz, /readyz and /metrics: for probes and Prometheus."""
from __future__ import annotations

from fastapi import Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from synth_service.dependencies import MetricsDep, ServiceIfStartedDep, SettingsDep
from synth_service.openapi_responses import ERRORS
from synth_service.route_table import RouteTable
from synth_service.schemas import Health, Readiness

router = RouteTable(tags=["operations"])


@router.get("/healthz")
async def healthz() -> Health:
    """The process is up (no auth)."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Readiness}})
async def readyz(svc: ServiceIfStartedDep,
                 settings: SettingsDep) -> Readiness:
    """Teacher loaded and, when a stream is configured, Redis reachable."""
    redis = "not configured" if settings.stream.redis_url is None else (
        "ok" if svc is not None and svc.production.redis_ok else "unavailable")
    body = Readiness(ready=svc is not None and redis != "unavailable", teacher_loaded=svc is not None,
                     redis=redis, queue_images=svc.batcher.queued_images if svc else 0)
    if not body.ready:
        return JSONResponse(body.model_dump(), status_code=503)
    return body


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, 401: ERRORS[401]})
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
