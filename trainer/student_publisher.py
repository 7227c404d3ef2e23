"""Rank 0 publishes its student for the synthesis service's adversarial terms (shared/student_channel.py): every
`feedback.publish_every` steps, at the stage switch and at the end. Feedback never stops training."""
from __future__ import annotations

from typing import Callable

import redis
import torch.nn as nn

from shared.config import FeedbackConfig, Settings, StudentConfig
from shared.stream import connect_redis
from shared.student_channel import StudentCard, publish_student
from shared.teacher import TeacherCard
from trainer.metrics import TrainerMetrics


class StudentPublisher:
    def __init__(self, client: redis.Redis, key: str, student: StudentConfig, teacher_card: TeacherCard,
                 feedback: FeedbackConfig, metrics: TrainerMetrics, log: Callable[[str], None]):
        self.client, self.key, self.student, self.teacher_card = client, key, student, teacher_card
        self.feedback, self.metrics, self.log = feedback, metrics, log
        self.last_step: int | None = None  # of the last successful publication
        self._failing = False

    @classmethod
    def from_settings(cls, settings: Settings, student: StudentConfig, teacher_card: TeacherCard,
                      metrics: TrainerMetrics, log: Callable[[str], None]) -> "StudentPublisher | None":
        """None unless feedback is on and there is a Redis to publish to."""
        if not settings.feedback.enabled or settings.stream.redis_url is None:
            return None
        # A short connect timeout: with Redis down, each due publication costs training at most this long.
        client = connect_redis(settings.stream.redis_url, connect_timeout_s=2.0, timeout_s=30.0)
        return cls(client, settings.stream.key("student"), student, teacher_card, settings.feedback, metrics, log)

    def due(self, step: int, stage_switch: bool) -> bool:
        return step != self.last_step and (step % self.feedback.publish_every == 0 or stage_switch)

    def publish(self, model: nn.Module, step: int, stage: int) -> StudentCard | None:
        """Publish `model` (the bare student) as trained through `step` in `stage`; None when that failed."""
        try:
            card = publish_student(self.client, self.key, model, student=self.student,
                                   teacher_card=self.teacher_card, step=step, stage=stage,
                                   max_bytes=self.feedback.max_bytes)
        except Exception as exc:  # Redis down, too large: the service keeps its older student
            self.metrics.student_publish_failures.inc()
            if not self._failing:  # one line per outage, not one per due step
                self.log(f"feedback: student at step {step} not published ({exc}); training goes on")
            self._failing = True
            return None
        if self._failing:
            self.log(f"feedback: student published again at step {step}")
        self._failing = False
        self.last_step = step
        self.metrics.student.set(step, card.published_at)
        return card

    def close(self) -> None:
        self.client.close()
