"""POST /v1/images: a few images, synchronously (synthesised, or from the warm pool); GET /v1/pool: the pool."""
from __future__ import annotations

import asyncio
import time

from fastapi import HTTPException, Response

from synth_service.dependencies import ServiceDep
from synth_service.encode import MEDIA_TYPES, encode_result, quality_headers
from synth_service.http_errors import unprocessable
from synth_service.lifespan import Service
from synth_service.openapi_responses import BINARY, ERRORS
from synth_service.request_checks import check_image_request
from synth_service.result import SynthResult
from synth_service.route_table import RouteTable
from synth_service.schemas import ErrorBody, ImageRequest, PoolStatus

router = RouteTable(tags=["images"])
INLINE_ENCODE_BYTES = 64 * 1024


@router.post("/v1/images", responses={200: BINARY, **ERRORS, 504: {"model": ErrorBody, "description": "timed out"}},
             response_class=Response)
async def create_images(req: ImageRequest, svc: ServiceDep) -> Response:
    """Synthesize a few images synchronously, in a class-balanced engine batch (filled up with other classes when
    the request alone cannot fill one), or take them from the warm pool with `"fresh": false`."""
    cfg = svc.settings.service
    check_image_request(req, svc.teacher.card, cfg, min(cfg.sync_max_images, svc.batcher.max_batch))
    labels = [c for c in req.class_ids for _ in range(req.per_class)]  # a row per class in a grid
    headers: dict[str, str] = {}
    result, age_s = None, None
    if not wants_fresh(req, svc):
        # In memory a take is a few list operations: a thread hop would cost more than it saves.
        draw = svc.pool.take(labels) if svc.pool.in_memory else await asyncio.to_thread(svc.pool.take, labels)
        svc.batcher.wake()  # the pool refills what was taken, or what it lacked
        svc.metrics.pool_requests.labels("hit" if draw else "cold").inc()
        headers["X-Pool"] = "hit" if draw else "cold"
        if draw is not None:
            result, age_s = draw.result, draw.age_s
    if result is None:
        result = await synthesize(svc, labels, req)
    names = svc.teacher.card.class_names
    if result.images.numel() <= INLINE_ENCODE_BYTES:  # a few small images: quicker here than through a thread
        body = encode_result(result, req.format, names, age_s)
    else:
        body = await asyncio.to_thread(encode_result, result, req.format, names, age_s)
    return Response(body, media_type=MEDIA_TYPES[req.format], headers={
        "X-Image-Count": str(len(labels)), "X-Labels": ",".join(map(str, result.labels.tolist())),
        "X-Source": "pool" if age_s is not None else "synthesis", **headers, **quality_headers(result, age_s)})


@router.get("/v1/pool", responses=ERRORS)
async def pool_status(svc: ServiceDep) -> PoolStatus:
    """The warm per-class pool: images per class, bytes against the cap, the oldest image's age."""
    if svc.pool is None:
        return PoolStatus(enabled=False)
    return PoolStatus(**svc.pool.status())


def wants_fresh(req: ImageRequest, svc: Service) -> bool:
    """The request's `fresh`, else the service default; a pool image cannot honour a seed or iterations."""
    if req.fresh is None:
        return svc.pool is None or not svc.settings.service.pool.serve_by_default or \
            req.seed is not None or req.iterations is not None
    if not req.fresh:
        if svc.pool is None:
            raise unprocessable("fresh", "this service has no warm pool (service.pool.enabled is false): omit "
                                         "`fresh` or set it true")
        for field in ("seed", "iterations"):
            if getattr(req, field) is not None:
                raise unprocessable(field, f"pool images were made with the service's own {field}; a request "
                                           f"that sets {field} needs `fresh: true`")
    return req.fresh


async def synthesize(svc: Service, labels: list[int], req: ImageRequest) -> SynthResult:
    cfg = svc.settings.service
    seed = req.seed if req.seed is not None else int(time.time_ns() % (2**31))
    future = svc.batcher.submit(labels, req.iterations, seed)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), cfg.request_timeout_s)
    except asyncio.TimeoutError:
        future.cancel()
        raise HTTPException(504, detail=f"not done within {cfg.request_timeout_s:.0f}s") from None

