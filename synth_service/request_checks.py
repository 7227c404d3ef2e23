"""Checks on a request body that need the loaded teacher or the service limits, which the schemas cannot know.
Each failure is a 422 naming the field at fault."""
from __future__ import annotations

from shared.config import ServiceConfig
from shared.errors import InvalidRequestError
from shared.teacher import TeacherCard
from synth_service.http_errors import unprocessable
from synth_service.labels import check_class_ids
from synth_service.schemas import ImageRequest, ProductionUpdate


def check_image_request(req: ImageRequest, card: TeacherCard, cfg: ServiceConfig, max_images: int) -> None:
    try:
        check_class_ids(card, req.class_ids)
    except InvalidRequestError as exc:
        raise unprocessable("class_ids", str(exc)) from None
    total = len(req.class_ids) * req.per_class
    if total > max_images:
        raise unprocessable("per_class", f"{total} images requested; this endpoint serves at most "
                                         f"{max_images} (use POST /v1/jobs for more)")
    if req.iterations is not None and req.iterations > cfg.max_iterations:
        raise unprocessable("iterations", f"iterations must be <= {cfg.max_iterations}")


def check_production_update(update: ProductionUpdate, card: TeacherCard, per_class_now: int, max_batch: int) -> None:
    if update.classes is not None:
        try:
            check_class_ids(card, update.classes)
        except InvalidRequestError as exc:
            raise unprocessable("classes", str(exc)) from None
    per_class = update.per_class if update.per_class is not None else per_class_now
    if per_class > max_batch:
        raise unprocessable("per_class", f"per_class {per_class} is larger than an engine batch ({max_batch} "
                                         "images): production deals whole per-class groups into batches, so none "
                                         "would ever fit")
