"""GET /v1/classes and /v1/info: the teacher's classes, the teacher itself, the synthesis defaults and the limits."""
from __future__ import annotations

from synth_service.dependencies import ServiceDep
from synth_service.openapi_responses import ERRORS
from synth_service.route_table import RouteTable
from synth_service.schemas import ClassInfo, ClassList, ServiceInfo, TeacherInfo

router = RouteTable(tags=["metadata"])


@router.get("/v1/classes", responses=ERRORS)
async def classes(svc: ServiceDep) -> ClassList:
    return ClassList(classes=[ClassInfo(id=i, name=n) for i, n in enumerate(svc.teacher.card.class_names)])


@router.get("/v1/info", responses=ERRORS)
async def info(svc: ServiceDep) -> ServiceInfo:
    c, cfg = svc.teacher.card, svc.settings.service
    return ServiceInfo(
        teacher=TeacherInfo(name=c.name, arch=c.arch, num_classes=c.num_classes, in_chans=c.in_chans,
                            image_size=c.image_size, mean=list(c.mean), std=list(c.std),
                            fingerprint=c.fingerprint, metrics=c.metrics),
        method=svc.engine.describe(),
        synthesis_defaults=svc.settings.synth.model_dump(mode="json"),
        limits={"max_batch": svc.batcher.max_batch, "sync_max_images": cfg.sync_max_images,
                "job_max_images": cfg.job_max_images, "max_iterations": cfg.max_iterations,
                "max_queue_images": cfg.max_queue_images, "max_wait_ms": cfg.max_wait_ms,
                "max_body_bytes": cfg.max_body_bytes, "job_retention_bytes": cfg.job_retention_bytes,
                "min_batch_fill": svc.batcher.min_fill},
        device=str(svc.engine.device))
