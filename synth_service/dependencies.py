"""What a route needs from the app, taken from the request (FastAPI dependencies)."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from shared.config import Settings
from synth_service.lifespan import Service
from synth_service.metrics import SynthMetrics


def get_service(request: Request) -> Service:
    """The running service; the lifespan sets it before the first request is served."""
    return request.app.state.service


def get_service_if_started(request: Request) -> Service | None:
    """None until the lifespan has loaded the teacher (what /readyz reports)."""
    return getattr(request.app.state, "service", None)


def get_settings(request: Request) -> Settings:
    """Set when the app is built, so available before the service has started."""
    return request.app.state.settings


def get_metrics(request: Request) -> SynthMetrics:
    return request.app.state.metrics


# For route signatures: `svc: ServiceDep` rather than `svc: Service = Depends(get_service)`.
ServiceDep = Annotated[Service, Depends(get_service)]
ServiceIfStartedDep = Annotated[Service | None, Depends(get_service_if_started)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[SynthMetrics, Depends(get_metrics)]
