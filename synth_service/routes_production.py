"""/v1/production: continuous production into the Redis stream, watched and steered."""
from __future__ import annotations

from fastapi import HTTPException

from synth_service.dependencies import ServiceDep
from synth_service.openapi_responses import ERRORS
from synth_service.request_checks import check_production_update
from synth_service.route_table import RouteTable
from synth_service.schemas import ErrorBody, ProductionStatus, ProductionUpdate

router = RouteTable(tags=["production"])


@router.get("/v1/production", responses=ERRORS)
async def production_status(svc: ServiceDep) -> ProductionStatus:
    return svc.production.status()


@router.put("/v1/production",
            responses={409: {"model": ErrorBody, "description": "no Redis stream configured"}, **ERRORS})
async def production_update(update: ProductionUpdate, svc: ServiceDep) -> ProductionStatus:
    """Start or stop continuous production into the Redis stream, and set the class policy."""
    if update.enabled and svc.settings.stream.redis_url is None:
        raise HTTPException(409, detail="no Redis stream configured (stream.redis_url)")
    check_production_update(update, svc.teacher.card, svc.production.per_class, svc.batcher.max_batch)
    svc.production.update(update)
    svc.batcher.wake()
    return svc.production.status()
