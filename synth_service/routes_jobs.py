"""/v1/jobs: large image counts, queued, polled, fetched and dropped."""
from __future__ import annotations

import asyncio

from fastapi import HTTPException, Response

from synth_service.dependencies import ServiceDep
from synth_service.encode import MEDIA_TYPES
from synth_service.openapi_responses import BINARY, ERRORS, GONE
from synth_service.request_checks import check_image_request
from synth_service.route_table import RouteTable
from synth_service.schemas import ErrorBody, JobRequest, JobStatus

router = RouteTable(tags=["jobs"])


@router.post("/v1/jobs", status_code=202, responses=ERRORS)
async def create_job(req: JobRequest, svc: ServiceDep) -> JobStatus:
    """Queue a large request; poll its status and fetch the result when done."""
    check_image_request(req, svc.teacher.card, svc.settings.service, svc.settings.service.job_max_images)
    return svc.jobs.create(req, req.iterations).status()


@router.get("/v1/jobs/{job_id}", responses={**GONE, **ERRORS})
async def job_status(job_id: str, svc: ServiceDep) -> JobStatus:
    return svc.jobs.get(job_id).status()


@router.get("/v1/jobs/{job_id}/result", response_class=Response,
            responses={200: BINARY, **GONE, 409: {"model": ErrorBody, "description": "not done yet"}, **ERRORS})
async def job_result(job_id: str, svc: ServiceDep) -> Response:
    job = svc.jobs.get(job_id)
    if job.state != "done":
        raise HTTPException(409, detail=f"job is {job.state}" + (f": {job.error}" if job.error else ""))
    body = await asyncio.to_thread(svc.jobs.result_bytes, job)
    return Response(body, media_type=MEDIA_TYPES[job.request.format])


@router.delete("/v1/jobs/{job_id}", responses={**GONE, **ERRORS})
async def delete_job(job_id: str, svc: ServiceDep) -> JobStatus:
    """Cancel a running job, or drop a finished one."""
    return svc.jobs.delete(job_id).status()
