"""The versioned wire format of a synthetic batch on the stream: a JSON header + raw bytes. Never pickle.

An entry is the field map {b"header": JSON, b"payload": bytes}. The payload is the uint8 NCHW image bytes followed,
when present, by teacher logits: float16 (little-endian) [M, V, N, K], one [N, K] block per ensemble member (member 0
is the primary teacher) and per view of the images (identity, h-flip). Version 1 carried one [N, K] block, the
primary's on the identity view; it still decodes, as M = V = 1. A batch larger than the entry cap is split
into chunks; every chunk carries the whole batch header plus its own chunk_index/chunk_count, so any single entry
can be inspected on its own and a reader can tell exactly which chunks are missing.
See docs/architecture.md §5.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from shared.errors import WireFormatError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

HEADER_FIELD = b"header"
PAYLOAD_FIELD = b"payload"
LOGITS_DTYPE = np.dtype("<f2")  # explicit byte order: readers on any machine agree
LOGIT_VIEWS = ("identity", "hflip")  # the views logits can be shipped for, in the order they are stored
MAX_MEMBERS = 16

EntryFields = dict[bytes, bytes]

# Ids end up in Redis keys, file names and logs: keep them to a charset that is safe in all three.
SAFE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
SHA256_HEX = r"^[0-9a-f]{64}$"

# A header is a few KB (labels, synthesis params); reading one larger than this would let a field size our memory.
MAX_HEADER_BYTES = 1 << 20

# Room left in each chunk's budget for the digits of chunk_index/chunk_count, which differ from chunk to chunk.
_CHUNK_FIELD_SLACK = 40


class SynthesisRecord(BaseModel):
    """How the batch was made: enough to reproduce it."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, JsonValue] = Field(default_factory=dict)
    seed: int


class LogitsBlock(BaseModel):
    """Which logits follow the images: one [N, K] float16 block per (member, view), member-major."""

    model_config = ConfigDict(extra="forbid")

    members: list[Annotated[str, Field(pattern=SHA256_HEX)]] = Field(min_length=1, max_length=MAX_MEMBERS)
    views: list[Literal[LOGIT_VIEWS]] = Field(min_length=1, max_length=len(LOGIT_VIEWS))
    classes: int = Field(ge=1)
    dtype: Literal["float16"] = "float16"

    @model_validator(mode="after")
    def _unique(self) -> "LogitsBlock":
        if len(set(self.members)) != len(self.members):
            raise ValueError("an ensemble member is listed twice")
        if list(self.views) != [v for v in LOGIT_VIEWS if v in self.views]:
            raise ValueError(f"views must be distinct and in the order {list(LOGIT_VIEWS)}")
        return self

    def shape(self, images: int) -> tuple[int, int, int, int]:
        return len(self.members), len(self.views), images, self.classes


def _from_version_1(data: dict) -> dict:
    """A version-1 header as version 2: its [N, K] logits are the primary teacher's on the identity view."""
    data = dict(data, version=SCHEMA_VERSION)
    shape, dtype = data.pop("logits_shape", None), data.pop("logits_dtype", None)
    if shape is not None or dtype is not None:
        if not isinstance(shape, (list, tuple)) or len(shape) != 2 or dtype != "float16":
            raise ValueError(f"version-1 logits_shape {shape!r} / logits_dtype {dtype!r}: expected [N, K] float16")
        if shape[0] != len(data.get("labels") or []):
            raise ValueError(f"logits_shape {list(shape)} does not have one row per image")
        data["logits"] = {"members": [data.get("teacher_fingerprint")], "views": ["identity"], "classes": shape[1]}
    return data


class BatchHeader(BaseModel):
    """The JSON header of every entry of a batch. Validation here is what a reader trusts."""

    # NaN/inf stats (a diverged run) stay representable instead of silently becoming null.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    version: int
    batch_id: str = Field(pattern=SAFE_ID)
    sequence: int = Field(ge=0)
    producer_id: str = Field(pattern=SAFE_ID)
    teacher_fingerprint: str = Field(pattern=SHA256_HEX)
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1, le=4)],
                 Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NCHW"] = "NCHW"
    mean: tuple[float, ...]
    std: tuple[Annotated[float, Field(gt=0)], ...]
    labels: list[Annotated[int, Field(ge=0)]]
    logits: LogitsBlock | None = None
    synthesis: SynthesisRecord
    stats: dict[str, float | list[float]] = Field(default_factory=dict)
    created_at: float
    payload_sha256: str = Field(pattern=SHA256_HEX)
    payload_bytes: int = Field(ge=1)
    chunk_index: int = Field(0, ge=0)
    chunk_count: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _known_version(cls, data: object) -> object:
        # Checked first so a future format fails with one clear message, not a list of field errors.
        if isinstance(data, dict) and data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"unsupported wire schema version {data.get('version')!r}; "
                             f"this reader understands versions {', '.join(map(str, READABLE_VERSIONS))}")
        if isinstance(data, dict) and data.get("version") == 1:
            return _from_version_1(data)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "BatchHeader":
        n, c = self.shape[0], self.shape[1]
        if len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} labels for {n} images (shape {list(self.shape)})")
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std have {len(self.mean)}/{len(self.std)} values for {c} channels")
        if self.logits is not None and self.logits.members[0] != self.teacher_fingerprint:
            raise ValueError("logits.members[0] must be the primary teacher (teacher_fingerprint)")
        if self.payload_bytes != self.expected_payload_bytes:
            raise ValueError(f"payload_bytes {self.payload_bytes} != {self.expected_payload_bytes} implied by "
                             f"shape {list(self.shape)} and logits {list(self.logits_shape or []) or None}")
        if self.chunk_index >= self.chunk_count:
            raise ValueError(f"chunk_index {self.chunk_index} out of range for chunk_count {self.chunk_count}")
        return self

    @property
    def image_bytes(self) -> int:
        return math.prod(self.shape)

    @property
    def logits_shape(self) -> tuple[int, int, int, int] | None:
        """[members, views, images, classes], or None without logits."""
        return self.logits.shape(self.shape[0]) if self.logits is not None else None

    @property
    def expected_payload_bytes(self) -> int:
        logits = math.prod(self.logits_shape) * LOGITS_DTYPE.itemsize if self.logits is not None else 0
        return self.image_bytes + logits


@dataclass
class WireBatch:
    """A batch as producers build it and readers get it back: metadata + uint8 NCHW images, and optionally float16
    logits [M, V, N, K] of the ensemble `logit_members` (member 0: the teacher) on the views `logit_views`."""

    batch_id: str
    sequence: int
    producer_id: str
    teacher_fingerprint: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: list[int]
    images: np.ndarray
    synthesis: SynthesisRecord
    logits: np.ndarray | None = None
    logit_members: tuple[str, ...] = ()    # () with logits: the teacher alone
    logit_views: tuple[str, ...] = ("identity",)
    stats: dict[str, float | list[float]] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.logit_members, self.logit_views = tuple(self.logit_members), tuple(self.logit_views)
        if self.logits is not None and not self.logit_members:
            self.logit_members = (self.teacher_fingerprint,)

    def logits_block(self) -> LogitsBlock | None:
        if self.logits is None:
            return None
        return LogitsBlock(members=list(self.logit_members),
                           views=list(self.logit_views), classes=self.logits.shape[-1])

    def primary_logits(self) -> np.ndarray | None:
        """[N, K]: the teacher's logits on the images as stored (member 0, identity view), or None."""
        if self.logits is None or "identity" not in self.logit_views:
            return None
        return self.logits[0, self.logit_views.index("identity")]


def logit_names(header: BatchHeader) -> dict:
    """WireBatch's logit_members and logit_views for `header` (empty when it has no logits)."""
    if header.logits is None:
        return {}
    return {"logit_members": tuple(header.logits.members), "logit_views": tuple(header.logits.views)}


def _explain(error: ValidationError) -> str:
    def one(e: dict) -> str:
        where, what = ".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, ")
        return f"{where}: {what}" if where else what

    return "; ".join(one(e) for e in error.errors())


def _field(fields: Mapping[bytes, bytes], name: bytes) -> bytes:
    # Entries read back from Redis have bytes keys; str keys are accepted too (hand-built entries, other clients).
    value = fields.get(name, fields.get(name.decode()))  # type: ignore[call-overload]
    if value is None:
        raise WireFormatError(f"stream entry has no {name.decode()!r} field (fields: {sorted(map(str, fields))})")
    return value


def decode_header(fields: Mapping[bytes, bytes]) -> BatchHeader:
    """The validated header of one entry."""
    raw = _field(fields, HEADER_FIELD)
    if len(raw) > MAX_HEADER_BYTES:
        raise WireFormatError(f"batch header of {len(raw)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    try:
        return BatchHeader.model_validate_json(raw)
    except ValidationError as error:
        raise WireFormatError(f"bad batch header: {_explain(error)}") from None


class BatchCodec:
    """WireBatch <-> stream entries. Stateless; one instance can serve every thread."""

    def header(self, batch: WireBatch, payload: bytes) -> BatchHeader:
        try:
            block = batch.logits_block()
            return BatchHeader(
                version=SCHEMA_VERSION, batch_id=batch.batch_id, sequence=batch.sequence,
                producer_id=batch.producer_id, teacher_fingerprint=batch.teacher_fingerprint,
                shape=batch.images.shape, mean=batch.mean, std=batch.std, labels=list(batch.labels),
                logits=block, synthesis=batch.synthesis, stats=batch.stats, created_at=batch.created_at,
                payload_sha256=hashlib.sha256(payload).hexdigest(), payload_bytes=len(payload))
        except ValidationError as error:
            raise WireFormatError(f"batch {batch.batch_id!r} cannot be encoded: {_explain(error)}") from None

    def payload(self, batch: WireBatch) -> bytes:
        if not isinstance(batch.images, np.ndarray) or batch.images.dtype != np.uint8 or batch.images.ndim != 4:
            raise WireFormatError(f"batch {batch.batch_id!r}: images must be a uint8 NCHW numpy array, got "
                                  f"{getattr(batch.images, 'dtype', type(batch.images))} "
                                  f"{getattr(batch.images, 'shape', '')}")
        parts = [np.ascontiguousarray(batch.images).tobytes()]
        if batch.logits is not None:
            if not isinstance(batch.logits, np.ndarray) or batch.logits.dtype != np.float16 or batch.logits.ndim != 4:
                raise WireFormatError(f"batch {batch.batch_id!r}: logits must be a float16 [M, V, N, K] numpy array")
            members = len(batch.logit_members)
            expected = (members, len(batch.logit_views), batch.images.shape[0])
            if batch.logits.shape[:3] != expected:
                raise WireFormatError(f"batch {batch.batch_id!r}: logits are {list(batch.logits.shape)}; {members} "
                                      f"member(s), {len(batch.logit_views)} view(s) and {batch.images.shape[0]} "
                                      f"images need {list(expected)} + [K]")
            parts.append(np.ascontiguousarray(batch.logits, dtype=LOGITS_DTYPE).tobytes())
        return b"".join(parts)

    def encode(self, batch: WireBatch, max_entry_bytes: int) -> list[EntryFields]:
        """Stream entries for `batch`; each entry's header + payload stays within `max_entry_bytes`."""
        payload = self.payload(batch)
        header = self.header(batch, payload)
        header_json = header.model_dump_json().encode()
        header_bytes = len(header_json)
        if header_bytes > MAX_HEADER_BYTES - _CHUNK_FIELD_SLACK:
            raise WireFormatError(f"batch {batch.batch_id!r}: its {header_bytes}-byte header is over the "
                                  f"{MAX_HEADER_BYTES}-byte limit (too many labels or stats)")
        if header_bytes + len(payload) <= max_entry_bytes:
            return [{HEADER_FIELD: header_json, PAYLOAD_FIELD: payload}]
        room = max_entry_bytes - header_bytes - _CHUNK_FIELD_SLACK
        if room < 1:
            raise WireFormatError(f"batch {batch.batch_id!r}: its {header_bytes}-byte header leaves no room for "
                                  f"payload in entries of {max_entry_bytes} bytes; raise the entry size cap")
        count = -(-len(payload) // room)
        return [{HEADER_FIELD: header.model_copy(update={"chunk_index": i, "chunk_count": count})
                 .model_dump_json().encode(),
                 PAYLOAD_FIELD: payload[i * room:(i + 1) * room]} for i in range(count)]

    def decode(self, entries: Sequence[Mapping[bytes, bytes]]) -> WireBatch:
        """Reassemble and validate one batch from all its entries (any order)."""
        if not entries:
            raise WireFormatError("no stream entries to decode")
        headers = [decode_header(fields) for fields in entries]
        first = headers[0]
        self._check_chunks(headers)
        ordered = sorted(zip(headers, entries), key=lambda pair: pair[0].chunk_index)
        payload = bytearray()  # writable, so the arrays below can be handed to torch without a copy
        for _, fields in ordered:
            payload += _field(fields, PAYLOAD_FIELD)
        if len(payload) != first.payload_bytes:
            raise WireFormatError(f"batch {first.batch_id!r}: payload is {len(payload)} bytes, header says "
                                  f"{first.payload_bytes}")
        if hashlib.sha256(payload).hexdigest() != first.payload_sha256:
            raise WireFormatError(f"batch {first.batch_id!r}: payload checksum mismatch (corrupted in transit "
                                  "or in the store)")
        images = np.frombuffer(payload, dtype=np.uint8, count=first.image_bytes).reshape(first.shape)
        logits = None
        if first.logits is not None:
            logits = np.frombuffer(payload, dtype=LOGITS_DTYPE, offset=first.image_bytes).reshape(first.logits_shape)
            logits = logits.astype(np.float16, copy=False)  # native order; no copy on little-endian hosts
        return WireBatch(batch_id=first.batch_id, sequence=first.sequence, producer_id=first.producer_id,
                         teacher_fingerprint=first.teacher_fingerprint, mean=first.mean, std=first.std,
                         labels=first.labels, images=images, synthesis=first.synthesis, logits=logits,
                         **logit_names(first), stats=first.stats, created_at=first.created_at)

    @staticmethod
    def _check_chunks(headers: list[BatchHeader]) -> None:
        first = headers[0]
        for other in headers[1:]:
            if other.batch_id != first.batch_id or other.payload_sha256 != first.payload_sha256:
                raise WireFormatError(f"entries of different batches mixed: {first.batch_id!r} "
                                      f"({first.payload_sha256[:12]}) and {other.batch_id!r} "
                                      f"({other.payload_sha256[:12]})")
            # JSON comparison: NaN stats compare equal as text, not as floats.
            if other.model_dump_json(exclude={"chunk_index"}) != first.model_dump_json(exclude={"chunk_index"}):
                raise WireFormatError(f"batch {first.batch_id!r}: chunk headers disagree beyond chunk_index")
        indices = sorted(h.chunk_index for h in headers)
        if indices != list(range(len(headers))) or len(headers) != first.chunk_count:
            # Sized by what was received, never by the claimed chunk_count.
            received = set(indices)
            duplicated = sorted({i for i in indices if indices.count(i) > 1})
            missing = [i for i in range(min(first.chunk_count, len(headers) + 10)) if i not in received]
            raise WireFormatError(f"batch {first.batch_id!r}: chunks incomplete or repeated for chunk_count "
                                  f"{first.chunk_count}: {len(headers)} received, missing {missing[:10]}"
                                  f"{'...' if first.chunk_count - len(received) > 10 else ''}, "
                                  f"duplicated {duplicated[:10]}")
