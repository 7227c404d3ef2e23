"""The trainer's current student for the adversarial terms: a thread polls Redis and hands each newer, valid
publication (shared/student_channel.py) to `on_student`. Refusals and outages are counted and logged once."""
from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Callable

import redis
import torch
import torch.nn as nn

from shared.config import Settings
from shared.errors import DfkdError
from shared.stream import connect_redis
from shared.student_channel import (CARD_FIELD, StudentCard, StudentChannelError, load_published_student,
                                    parse_student_card)
from shared.teacher import TeacherCard

if TYPE_CHECKING:
    from synth_service.metrics import SynthMetrics


class StudentFeedback:
    def __init__(self, settings: Settings, teacher_card: TeacherCard, metrics: "SynthMetrics",
                 on_student: Callable[[nn.Module, StudentCard], None], log: Callable[[str], None] = print,
                 device: torch.device | str = "cpu", client: redis.Redis | None = None):
        if client is None and settings.stream.redis_url is None:
            raise DfkdError("student feedback needs stream.redis_url: the trainer publishes its student there")
        self.client = client or connect_redis(settings.stream.redis_url, connect_timeout_s=2.0, timeout_s=30.0)
        self.key = settings.stream.key("student")
        self.teacher_card, self.metrics, self.on_student, self.log = teacher_card, metrics, on_student, log
        self.poll_s, self.max_bytes, self.device = settings.feedback.poll_s, settings.feedback.max_bytes, device
        self.card: StudentCard | None = None  # the one handed to on_student last
        self._seen: str | None = None  # sha256 of the card bytes last skipped or refused: not read again
        self._outage = False
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "StudentFeedback":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="student-feedback", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
                self._last_error = None
            except Exception as exc:  # a bug must not end the thread; same message, one line
                if str(exc) != self._last_error:
                    self.log(f"feedback: poll failed: {exc!r}; still polling")
                self._last_error = str(exc)
            self._stop.wait(self.poll_s)

    def poll_once(self) -> StudentCard | None:
        """Load the published student if it is newer than the one held; the card handed on, else None."""
        try:
            raw = self.client.hget(self.key, CARD_FIELD)
            self._reachable()
            if raw is None:
                return None
            publication = hashlib.sha256(raw).hexdigest()
            if publication == self._seen:
                return None
            polled = parse_student_card(raw)
            held = self.card
            if held is not None and polled.step <= held.step and polled.sha256 == held.sha256:
                self._seen = publication  # the same student again
                return None
            model, card = load_published_student(self.client, self.key, self.teacher_card, self.max_bytes,
                                                 self.device)
        except StudentChannelError as exc:
            if exc.reason != "missing":  # deleted since the card was read: nothing to refuse
                self._refuse(exc.publication, exc.reason, str(exc))
            return None
        except (redis.RedisError, OSError) as exc:
            if not self._outage:
                self.log(f"feedback: Redis unreachable ({exc}); the service keeps its current student and polls "
                         f"every {self.poll_s:g}s")
            self._outage = True
            return None
        # A publication may have landed between the two reads: only the card polled is known by its bytes.
        known = publication if card == polled else None
        try:
            self.on_student(model, card)
        except Exception as exc:  # the synthesizer would not take it: keep the old one, do not retry this one
            self._refuse(known, "rejected", f"student from step {card.step} rejected: {exc}")
            return None
        self.card, self._seen = card, known
        self.metrics.student_loaded(card.step, card.published_at)
        self.log(f"feedback: student from step {card.step} (stage {card.stage}) loaded")
        return card

    def _reachable(self) -> None:
        if self._outage:
            self.log("feedback: Redis reachable again")
        self._outage = False

    def _refuse(self, publication: str | None, reason: str, message: str) -> None:
        if publication is not None and publication == self._seen:
            return
        self.metrics.student_refused.labels(reason).inc()
        self.log(f"feedback: {message}")
        self._seen = publication
