"""FastAPI app factory: the engine, batcher, jobs and stream production behind one HTTP API.

The routes live in `routes_*.py`, one module per OpenAPI tag; start-up and shutdown in `lifespan.py`.
See docs/architecture.md §6 for the rest of the layout.
"""
from __future__ import annotations

from fastapi import FastAPI

from shared.config import ServiceConfig, Settings
from shared.teacher import Teacher
from synth_service import routes_images, routes_jobs, routes_metadata, routes_operations, routes_production
from synth_service.http_errors import add_error_handlers
from synth_service.http_guards import BodyLimit, TokenGuard
from synth_service.lifespan import service_lifespan
from synth_service.metrics import SynthMetrics
from synth_service.request_metrics import observe

ROUTERS = (routes_images, routes_jobs, routes_metadata, routes_production, routes_operations)  # OpenAPI order


def create_app(settings: Settings, teacher: Teacher | None = None) -> FastAPI:
    """Build the service. The teacher is loaded from `settings.teacher` unless given."""
    cfg = settings.service
    # An empty token (e.g. an unset compose variable) means no auth, not "the empty string is the password".
    token = (cfg.auth_token.get_secret_value() if cfg.auth_token else "") or None

    app = FastAPI(title="dfkd synthesis service", version="1",
                  description="Synthetic images of any class from a teacher network (DeepInversion + BPID), "
                              "on demand over HTTP and continuously into a Redis stream.",
                  lifespan=service_lifespan(settings, teacher))
    app.state.settings = settings
    app.state.metrics = SynthMetrics()

    # Added innermost first: the metrics middleware wraps both, so 401s and 413s are counted too.
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    if token is not None:
        app.add_middleware(TokenGuard, token=token, open_paths=open_paths(app, cfg))
    app.middleware("http")(observe)
    add_error_handlers(app)
    for module in ROUTERS:
        module.router.add_to(app)
    return app


def open_paths(app: FastAPI, cfg: ServiceConfig) -> set[str]:
    """The paths served without the token when one is set: /healthz, and what the config opens on purpose."""
    paths = {"/healthz"}
    if cfg.docs_open:
        paths |= {p for p in (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url) if p}
    if not cfg.metrics_auth:
        paths.add("/metrics")
    return paths
