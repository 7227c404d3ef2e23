"""The trainer's current student, published to one Redis hash for the synthesis service's adversarial terms.

The hash `dfkd:{run}:student` holds two fields: `card` (a StudentCard as JSON) and `weights` (safetensors bytes of
the fp32 state dict; no pickle). Each publication replaces the previous one: only the latest student matters.
A reader validates everything against its own teacher before it builds a module.
"""
from __future__ import annotations

import hashlib
import time
from typing import NoReturn

import redis
import torch
import torch.nn as nn
from pydantic import BaseModel, Field, ValidationError, model_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.nn.parallel import DataParallel, DistributedDataParallel

from shared.config import StudentConfig
from shared.errors import DfkdError
from shared.models.dearkd_student import create_student
from shared.teacher import TeacherCard

CARD_FIELD = "card"
WEIGHTS_FIELD = "weights"

# Card, weights size and weights in one atomic read; the weights only when they fit, so an oversized
# publication is refused without being transferred. KEYS: the hash. ARGV: max bytes.
READ_SCRIPT = """
local card = redis.call('HGET', KEYS[1], 'card')
local n = redis.call('HSTRLEN', KEYS[1], 'weights')
if n > tonumber(ARGV[1]) then
  return {card, n}
end
return {card, n, redis.call('HGET', KEYS[1], 'weights')}
"""


class StudentChannelError(DfkdError, ValueError):
    """A student that is not published or not loaded; `reason` is a short label for metrics and logs."""

    def __init__(self, reason: str, message: str, publication: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.publication = publication  # sha256 of the card bytes read: which publication was refused


class StudentCard(BaseModel):
    """What a published student is, for which teacher, from which trainer step."""

    model_config = {"extra": "forbid"}

    student: StudentConfig
    step: int = Field(ge=0)
    stage: int = Field(ge=1, le=2)
    teacher_fingerprint: str
    num_classes: int = Field(ge=1)
    in_chans: int = Field(ge=1)
    image_size: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    nbytes: int = Field(ge=0)
    published_at: float = Field(ge=0)

    @model_validator(mode="after")
    def _check(self) -> "StudentCard":
        # The architecture is built from `student`: it must be the one the card's input and classes describe.
        own = (self.student.img_size, self.student.in_chans, self.student.num_classes)
        if own != (self.image_size, self.in_chans, self.num_classes):
            raise ValueError(f"student config (img_size, in_chans, num_classes) {own} disagrees with the card's "
                             f"{(self.image_size, self.in_chans, self.num_classes)}")
        return self


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bare(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (DataParallel, DistributedDataParallel)) else model


def student_bytes(model: nn.Module) -> bytes:
    """safetensors bytes of the bare student's state dict, floating tensors in fp32 (whatever the autocast)."""
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in _bare(model).state_dict().items()}
    return save_safetensors(state)


def publish_student(client: redis.Redis, key: str, model: nn.Module, *, student: StudentConfig,
                    teacher_card: TeacherCard, step: int, stage: int, max_bytes: int,
                    published_at: float | None = None) -> StudentCard:
    """Replace the publication at `key` with `model` (card and weights together, atomically); returns its card.

    Raises StudentChannelError('too_large') past `max_bytes`, and redis errors as they come."""
    student = student.for_teacher(teacher_card)  # a no-op for the trainer's config; an error for another teacher's
    weights = student_bytes(model)
    if len(weights) > max_bytes:
        raise StudentChannelError("too_large", f"the student's weights are {len(weights)} bytes, over "
                                  f"feedback.max_bytes ({max_bytes}): not published")
    card = StudentCard(student=student, step=step, stage=stage, teacher_fingerprint=teacher_card.fingerprint,
                       num_classes=teacher_card.num_classes, in_chans=teacher_card.in_chans,
                       image_size=teacher_card.image_size, sha256=_digest(weights), nbytes=len(weights),
                       published_at=time.time() if published_at is None else published_at)
    pipe = client.pipeline(transaction=True)  # MULTI/EXEC: a reader sees the old pair or the new one
    pipe.delete(key)
    pipe.hset(key, mapping={CARD_FIELD: card.model_dump_json(), WEIGHTS_FIELD: weights})
    pipe.execute()
    return card


def parse_student_card(raw: bytes) -> StudentCard:
    try:
        return StudentCard.model_validate_json(raw)
    except ValidationError as exc:
        raise StudentChannelError("malformed", f"the published student card does not validate: "
                                  f"{exc.error_count()} error(s), first: {exc.errors()[0]['msg']}",
                                  _digest(raw)) from None


def read_student_card(client: redis.Redis, key: str) -> StudentCard | None:
    """The card alone (the weights stay in Redis); None when nothing is published."""
    raw = client.hget(key, CARD_FIELD)
    return None if raw is None else parse_student_card(raw)


def check_card(card: StudentCard, teacher_card: TeacherCard, max_bytes: int, publication: str | None = None) -> None:
    """Refuse a card published for another teacher or larger than `max_bytes`, before reading its weights."""
    def refuse(reason: str, message: str) -> NoReturn:
        raise StudentChannelError(reason, f"student from step {card.step} refused: {message}", publication)

    if card.teacher_fingerprint != teacher_card.fingerprint:
        refuse("fingerprint", f"trained against teacher {card.teacher_fingerprint[:12]}, not this service's "
                              f"{teacher_card.fingerprint[:12]} (another run on the same Redis key?)")
    if card.num_classes != teacher_card.num_classes:
        refuse("classes", f"{card.num_classes} classes, the teacher has {teacher_card.num_classes}")
    if card.in_chans != teacher_card.in_chans:
        refuse("channels", f"{card.in_chans} input channels, the teacher takes {teacher_card.in_chans}")
    if card.image_size != teacher_card.image_size:
        refuse("input_size", f"{card.image_size} px input, the teacher takes {teacher_card.image_size} px")
    if card.nbytes > max_bytes:
        refuse("too_large", f"{card.nbytes} bytes of weights, over feedback.max_bytes ({max_bytes})")


def load_published_student(client: redis.Redis, key: str, teacher_card: TeacherCard, max_bytes: int,
                           device: torch.device | str = "cpu") -> tuple[nn.Module, StudentCard]:
    """The published student, validated against `teacher_card`, in eval mode and frozen, on `device`.

    Raises StudentChannelError with `reason` one of: missing, malformed, fingerprint, classes, channels,
    input_size, too_large, checksum, weights. Nothing is built before the card and the bytes check out."""
    found = client.eval(READ_SCRIPT, 1, key, max_bytes)
    raw, nbytes, weights = (list(found) + [None])[:3]
    if raw is None:
        raise StudentChannelError("missing", f"no student is published at {key}")
    publication = _digest(raw)
    card = parse_student_card(raw)
    check_card(card, teacher_card, max_bytes, publication)

    def refuse(reason: str, message: str) -> NoReturn:
        raise StudentChannelError(reason, f"student from step {card.step} refused: {message}", publication)

    if nbytes > max_bytes:
        refuse("too_large", f"{nbytes} bytes of weights stored, over feedback.max_bytes ({max_bytes})")
    if weights is None or len(weights) != card.nbytes or _digest(weights) != card.sha256:
        refuse("checksum", f"the weights ({nbytes} bytes) do not match the card's sha256 {card.sha256[:12]} "
                           f"({card.nbytes} bytes)")
    try:
        state = load_safetensors(weights)
    except Exception as exc:  # valid checksum over bytes that are not safetensors: a bad publisher
        refuse("weights", f"the weights do not decode as safetensors: {exc}")
    try:
        model = create_student(card.student)
    except Exception as exc:  # a config that validates but does not build
        refuse("malformed", f"its student config does not build: {exc}")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        refuse("weights", f"the weights do not fit its student config: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, shape mismatch {shapes[:3]}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False), card
