"""Counts and times every request by route template (bounded label values), whatever its answer."""
from __future__ import annotations

import time

from fastapi import Request


async def observe(request: Request, call_next):
    started = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    path = route.path if route is not None else "unmatched"
    metrics = request.app.state.metrics
    metrics.http_requests.labels(path, request.method, str(response.status_code)).inc()
    metrics.http_latency.labels(path, request.method).observe(time.perf_counter() - started)
    return response
