"""The project's errors as HTTP answers: 422 for bad input, 429 with Retry-After, 404 and 410 for jobs."""
from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.errors import InvalidRequestError
from synth_service.batcher import QueueFullError
from synth_service.http_guards import summarised_validation_errors
from synth_service.jobs import JobGone, JobNotFound


def unprocessable(field: str, message: str) -> HTTPException:
    """A 422 shaped like pydantic's own, naming the body field at fault."""
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=429,
                        headers={"Retry-After": str(int(max(1, round(exc.retry_after_s))))})


async def invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]}, status_code=422)


async def not_found(request: Request, exc: JobNotFound) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def gone(request: Request, exc: JobGone) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=410)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, summarised_validation_errors)
    app.add_exception_handler(QueueFullError, queue_full)
    app.add_exception_handler(InvalidRequestError, invalid)
    app.add_exception_handler(JobNotFound, not_found)
    app.add_exception_handler(JobGone, gone)
