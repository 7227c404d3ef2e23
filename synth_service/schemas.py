"""Request and response models of the HTTP API. Every field is bounded; limits that depend on the loaded teacher
or the service config (class range, request size, iteration cap) are checked in request_checks.py and also answer
422."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ImageFormat = Literal["png", "zip", "npz"]
ClassIds = list[int]


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"class_ids": [3, 7], "per_class": 2, "format": "png"},
                     {"class_ids": [1], "per_class": 4, "iterations": 200, "seed": 42, "format": "zip"}]})

    class_ids: list[int] = Field(min_length=1, max_length=256, description="target classes (see GET /v1/classes)")
    per_class: int = Field(1, ge=1, le=4096, description="images per class")
    iterations: int | None = Field(None, ge=0, le=100_000,
                                   description="optimisation steps (di: >= 1, scaling its schedule; generator: steps "
                                               "on a private copy of the generator, 0 = one forward pass); omit to "
                                               "use the service default (and to be coalesced with production)")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="seeds the request's starting noise")
    format: ImageFormat = Field("png", description="png: one image or a grid (a row per class); zip; npz")
    fresh: bool | None = Field(None, description="true: synthesise; false: serve from the warm pool "
                                                 "(service.pool) at once, or synthesise when it is cold (the "
                                                 "X-Pool header says which); omit for the service default "
                                                 "(service.pool.serve_by_default)")


class JobRequest(ImageRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"class_ids": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "per_class": 100, "format": "npz"}]})

    per_class: int = Field(1, ge=1, le=100_000, description="images per class")
    fresh: Literal[True] | None = Field(None, description="jobs always synthesise (the warm pool serves "
                                                          "POST /v1/images)")


JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class JobStatus(BaseModel):
    job_id: str
    state: JobState
    images_total: int
    images_done: int
    format: ImageFormat
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    result_url: str | None = None


class ClassInfo(BaseModel):
    id: int
    name: str


class ClassList(BaseModel):
    classes: list[ClassInfo]


class TeacherInfo(BaseModel):
    name: str
    arch: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: list[float]
    std: list[float]
    fingerprint: str
    metrics: dict[str, float]


class ServiceInfo(BaseModel):
    teacher: TeacherInfo
    method: dict = Field(description="the synthesis method (`method`) and its live state (e.g. warm, student step)")
    synthesis_defaults: dict
    limits: dict[str, int | float]
    device: str


class ProductionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"enabled": True, "classes": None, "per_class": 8, "target_images": 100000}]})

    enabled: bool
    classes: list[int] | None = Field(None, min_length=1, max_length=100_000,
                                      description="classes to produce, in turn; null: every class")
    per_class: int | None = Field(None, ge=2, le=4096, description="images per class in each batch (>= 2 for BPID)")
    target_images: int | None = Field(None, ge=1, le=10**12, description="stop after this many; null: no limit")


class ProductionStatus(BaseModel):
    enabled: bool
    classes: list[int] | None
    per_class: int
    target_images: int | None
    images_produced: int
    filler_published: int = Field(description="filler images of request batches published to the stream (not "
                                              "counted in images_produced or target_images)")
    batches_published: int
    pending_publish: int
    stream: str | None
    backlog: int | None
    max_backlog: int | None
    redis_ok: bool
    paused_reason: str | None


class PoolStatus(BaseModel):
    enabled: bool
    directory: str | None = None
    target_per_class: int | None = None
    images: int = 0
    images_per_class: list[int] = Field(default_factory=list)
    bytes: int = 0
    max_bytes: int | None = None
    oldest_age_s: float | None = None
    refilling: int = Field(0, description="images being synthesised for the pool now")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    teacher_loaded: bool
    redis: Literal["ok", "unavailable", "not configured"]
    queue_images: int


class ErrorBody(BaseModel):
    detail: str | list
