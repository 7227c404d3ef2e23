"""POST /v1/images: a few images, synchronously."""
from __future__ import annotations

import asyncio
import time

from fastapi import HTTPException, Response

from synth_service.dependencies import ServiceDep
from synth_service.encode import MEDIA_TYPES, encode_result
from synth_service.result import SynthResult
from synth_service.openapi_responses import BINARY, ERRORS
from synth_service.request_checks import check_image_request
from synth_service.route_table import RouteTable
from synth_service.schemas import ErrorBody, ImageRequest

router = RouteTable(tags=["images"])


@router.post("/v1/images", responses={200: BINARY, **ERRORS, 504: {"model": ErrorBody, "description": "timed out"}},
             response_class=Response)
async def create_images(req: ImageRequest, svc: ServiceDep) -> Response:
    """Synthesize a few images synchronously. They are coalesced with other requests into full batches."""
    cfg = svc.settings.service
    check_image_request(req, svc.teacher.card, cfg, min(cfg.sync_max_images, svc.batcher.max_batch))
    labels = [c for c in req.class_ids for _ in range(req.per_class)]  # a row per class in a grid
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
