"""Jobs for large image counts: fed to the batcher a chunk at a time, kept with bounded retention.

Retention is bounded in count, in age and in bytes. The byte budget covers the results of finished jobs and what
unfinished ones will hold once done (projected from their image count). A new job that cannot fit beside the
unfinished ones gets 429; to make room, the oldest finished results are evicted, and asking for them then answers
410 with the reason.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from shared.errors import DfkdError, InvalidRequestError
from synth_service.batcher import Batcher, QueueFullError
from synth_service.encode import encode_result
from synth_service.batch_plan import plan_batches
from synth_service.result import SynthResult
from synth_service.schemas import JobRequest, JobStatus

IN_FLIGHT_CHUNKS = 2  # enough to keep the engine busy without crowding out synchronous requests
TOMBSTONES = 1024  # evicted job ids remembered, so a late fetch learns why its result is gone


class JobNotFound(DfkdError, LookupError):
    pass


class JobGone(DfkdError, LookupError):
    """The job existed, but its result was evicted to keep within the retention budget."""


def lean(result: SynthResult) -> SynthResult:
    """Only what the response formats need: features, history and per-image terms stay behind."""
    n = len(result.labels)
    return SynthResult(images=result.images, labels=result.labels, teacher_top1=result.teacher_top1,
                       teacher_confidence=result.teacher_confidence, teacher_margin=result.teacher_margin,
                       features=torch.empty(n, 0), final_terms=result.final_terms, history={},
                       seconds=result.seconds, iterations=result.iterations, seed=result.seed, logits=result.logits,
                       verifier_top1=result.verifier_top1)


def result_bytes(result: SynthResult) -> int:
    tensors = (result.images, result.labels, result.teacher_top1, result.teacher_confidence, result.teacher_margin,
               result.logits, result.verifier_top1)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


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
    projected_bytes: int = 0  # what the results will take once done; counted against the budget until then

    @property
    def held_bytes(self) -> int:
        """Memory this job holds, or will hold: results (raw, or encoded once fetched)."""
        if not self.finished:
            return self.projected_bytes  # results are gathered only when the job is done
        return len(self.encoded) if self.encoded is not None else sum(map(result_bytes, self.results))

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def status(self) -> JobStatus:
        return JobStatus(job_id=self.job_id, state=self.state, images_total=self.images_total,
                         images_done=self.images_done, format=self.request.format, created_at=self.created_at,
                         finished_at=self.finished_at, error=self.error,
                         result_url=f"/v1/jobs/{self.job_id}/result" if self.state == "done" else None)


class JobManager:
    def __init__(self, batcher: Batcher, retention: int, ttl_s: float, class_names: list[str], *,
                 retention_bytes: int, bytes_per_image: int):
        self.batcher = batcher
        self.retention = retention
        self.ttl_s = ttl_s
        self.class_names = class_names
        self.retention_bytes = retention_bytes
        self.bytes_per_image = bytes_per_image
        self._jobs: dict[str, Job] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()  # evicted job id -> why

    def create(self, request: JobRequest, iterations: int | None) -> Job:
        self.batcher.engine.request_iterations(iterations)  # refuse a step count the method cannot run, up front
        self._evict()
        images = len(request.class_ids) * request.per_class
        projected = images * self.bytes_per_image
        if projected > self.retention_bytes:
            raise InvalidRequestError(f"{images} images need about {projected} bytes of results, over the "
                                      f"{self.retention_bytes}-byte job budget (service.job_retention_bytes); "
                                      "split the job or raise the budget")
        unfinished = [j for j in self._jobs.values() if not j.finished]
        reserved = sum(j.held_bytes for j in unfinished)
        if len(unfinished) >= self.retention or reserved + projected > self.retention_bytes:
            raise QueueFullError(f"{len(unfinished)} unfinished jobs hold {reserved} of the "
                                 f"{self.retention_bytes}-byte job budget and at most {self.retention} jobs are "
                                 "kept; retry when one finishes",
                                 retry_after_s=max(1.0, self.batcher.retry_after_s()))
        self._make_room(projected, new_jobs=1)
        job = Job(request, images_total=images, projected_bytes=projected)
        self._jobs[job.job_id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, iterations))
        return job

    def get(self, job_id: str) -> Job:
        self._evict()
        job = self._jobs.get(job_id)
        if job is None:
            if job_id in self._gone:
                raise JobGone(f"job {job_id!r} was dropped: {self._gone[job_id]}")
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept for {self.ttl_s:.0f}s)")
        return job

    @property
    def held_bytes(self) -> int:
        return sum(j.held_bytes for j in self._jobs.values())

    def delete(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.task is not None and not job.task.done():
            job.task.cancel()
        job.state = "cancelled" if not job.finished else job.state
        del self._jobs[job_id]
        return job

    def result_bytes(self, job: Job) -> bytes:
        if job.encoded is None:
            encoded = encode_result(SynthResult.concat(job.results), job.request.format, self.class_names)
            job.encoded, job.results = encoded, []  # the encoded copy is all a fetch needs from now on
            if job.job_id in self._jobs:
                self._make_room(0, new_jobs=0, keep=job)  # an encoding can outgrow the raw results it replaces
        return job.encoded

    async def shutdown(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()

    def _evict(self) -> None:
        now = time.time()
        for job in self._finished_oldest_first():
            if now - (job.finished_at or now) > self.ttl_s:
                self._drop(job, f"finished jobs are kept for {self.ttl_s:.0f}s")

    def _make_room(self, new_bytes: int, new_jobs: int, keep: Job | None = None) -> None:
        """Evict the oldest finished jobs (but `keep`) until `new_jobs` more jobs and `new_bytes` more bytes fit."""
        for job in self._finished_oldest_first():
            if len(self._jobs) + new_jobs <= self.retention and self.held_bytes + new_bytes <= self.retention_bytes:
                return
            if job is keep:
                continue
            self._drop(job, f"evicted, oldest first, to keep job results within {self.retention} jobs and "
                            f"{self.retention_bytes} bytes (service.job_retention, service.job_retention_bytes)")

    def _finished_oldest_first(self) -> list[Job]:
        return sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.finished_at or 0)

    def _drop(self, job: Job, why: str) -> None:
        del self._jobs[job.job_id]
        job.results, job.encoded = [], None
        self._gone[job.job_id] = why
        while len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)

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
                results[i] = lean(await asyncio.wrap_future(future))
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
