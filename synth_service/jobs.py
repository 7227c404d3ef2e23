"""Jobs for large image counts: fed to the batcher a chunk at a time, kept with bounded retention."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from shared.errors import DfkdError
from synth_service.batcher import Batcher, QueueFullError
from synth_service.encode import encode_result
from synth_service.engine import SynthResult, plan_batches
from synth_service.schemas import JobRequest, JobStatus

IN_FLIGHT_CHUNKS = 2  # enough to keep the engine busy without crowding out synchronous requests


class JobNotFound(DfkdError, LookupError):
    pass


@dataclass
class Job:
    request: JobRequest
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"
    images_total: int = 0
    images_done: int = 0
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    results: list[SynthResult] = field(default_factory=list)
    task: asyncio.Task | None = None
    encoded: bytes | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def status(self) -> JobStatus:
        return JobStatus(job_id=self.job_id, state=self.state, images_total=self.images_total,
                         images_done=self.images_done, format=self.request.format, created_at=self.created_at,
                         finished_at=self.finished_at, error=self.error,
                         result_url=f"/v1/jobs/{self.job_id}/result" if self.state == "done" else None)


class JobManager:
    def __init__(self, batcher: Batcher, retention: int, ttl_s: float, class_names: list[str]):
        self.batcher = batcher
        self.retention = retention
        self.ttl_s = ttl_s
        self.class_names = class_names
        self._jobs: dict[str, Job] = {}

    def create(self, request: JobRequest, iterations: int | None) -> Job:
        self._evict()
        if len(self._jobs) >= self.retention:
            raise QueueFullError(f"{len(self._jobs)} unfinished jobs already (the limit is {self.retention})",
                                 retry_after_s=max(1.0, self.batcher.retry_after_s()))
        job = Job(request, images_total=len(request.class_ids) * request.per_class)
        self._jobs[job.job_id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, iterations))
        return job

    def get(self, job_id: str) -> Job:
        self._evict()
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept for {self.ttl_s:.0f}s)")
        return job

    def delete(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.task is not None and not job.task.done():
            job.task.cancel()
        job.state = "cancelled" if not job.finished else job.state
        del self._jobs[job_id]
        return job

    def result_bytes(self, job: Job) -> bytes:
        if job.encoded is None:
            job.encoded = encode_result(SynthResult.concat(job.results), job.request.format, self.class_names)
        return job.encoded

    async def shutdown(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()

    def _evict(self) -> None:
        now = time.time()
        finished = sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.finished_at or 0)
        for job in finished:
            if now - (job.finished_at or now) > self.ttl_s or len(self._jobs) >= self.retention:
                del self._jobs[job.job_id]

    async def _run(self, job: Job, iterations: int | None) -> None:
        req = job.request
        chunks = plan_batches(req.class_ids, req.per_class, self.batcher.max_batch)
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.UUID(job.job_id).bytes[:4], "big")
        results: list[SynthResult | None] = [None] * len(chunks)
        semaphore = asyncio.Semaphore(IN_FLIGHT_CHUNKS)

        async def run_chunk(i: int, labels: list[int]) -> None:
            async with semaphore:
                while True:
                    try:
                        future = self.batcher.submit(labels, iterations, seed + i, destination="job")
                        break
                    except QueueFullError as exc:
                        await asyncio.sleep(min(exc.retry_after_s, 5.0))
                job.state = "running"
                results[i] = await asyncio.wrap_future(future)
                job.images_done += len(labels)

        try:
            await asyncio.gather(*(run_chunk(i, labels) for i, labels in enumerate(chunks)))
            job.results = [r for r in results if r is not None]
            job.state = "done"
        except asyncio.CancelledError:
            job.state = "cancelled"
            raise
        except Exception as exc:  # reported through the job's status, not lost
            job.state, job.error = "failed", str(exc)
        finally:
            job.finished_at = time.time()
