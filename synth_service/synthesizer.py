"""The `Synthesizer` interface every caller uses (batcher, HTTP app, CLI, benches), and the method registry.

A method is a class registered by name with `@register_synthesizer("name")`; `synth.method` picks one. Callers
never branch on the method: what differs between methods is behind `synthesize`, `batch_key` and `describe`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Hashable, Sequence

import torch
import torch.nn as nn

from shared.config import SynthConfig
from shared.errors import InvalidRequestError
from shared.teacher import Teacher, TeacherCard
from synth_service.batch_plan import plan_batches
from synth_service.labels import check_class_ids
from synth_service.result import ProgressFn, SynthResult
from synth_service.teacher_objective import TeacherObjective

_SYNTHESIZERS: dict[str, type["Synthesizer"]] = {}


def register_synthesizer(name: str) -> Callable[[type["Synthesizer"]], type["Synthesizer"]]:
    def add(cls: type["Synthesizer"]) -> type["Synthesizer"]:
        if name in _SYNTHESIZERS:
            raise ValueError(f"synthesis method {name!r} is registered twice")
        cls.method = name
        _SYNTHESIZERS[name] = cls
        return cls
    return add


def synthesis_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_SYNTHESIZERS)


def create_synthesizer(teacher: Teacher, config: SynthConfig, device: torch.device | str = "cpu",
                       student: nn.Module | None = None, **options: Any) -> "Synthesizer":
    """The method `config.method` names, built for `teacher`."""
    _load_builtin_methods()
    if config.method not in _SYNTHESIZERS:
        known = ", ".join(sorted(_SYNTHESIZERS))
        raise InvalidRequestError(f"unknown synthesis method {config.method!r}; known: {known}")
    return _SYNTHESIZERS[config.method](teacher, config, device=device, student=student, **options)


def _load_builtin_methods() -> None:
    # Importing a method's module registers it; the registry itself must not import them at load (cycles).
    import synth_service.engine  # noqa: F401  (di)
    import synth_service.generator_method  # noqa: F401  (generator)


class Synthesizer:
    """One method, bound to one frozen teacher. Use as a context manager, or call `close()`."""

    method: ClassVar[str] = ""
    card: TeacherCard
    config: SynthConfig
    objective: TeacherObjective  # every method optimises against the teacher's objective
    student_info: dict[str, Any] | None = None  # the card of the fed-back student in use

    @staticmethod
    def check_student(config: SynthConfig, student: nn.Module | None, student_optional: bool) -> None:
        """student_optional: a student may arrive later (fed back by the trainer); until then no adversarial term."""
        if config.competition > 0 and student is None and not student_optional:
            raise InvalidRequestError("synth.competition > 0 (the adversarial term) needs a student network: pass "
                                      "one, or feed the trainer's back (feedback.enabled)")

    # -- what every method provides ---------------------------------------------------------------------------------
    def synthesize(self, labels: Sequence[int] | torch.Tensor, seed: int = 0, iterations: int | None = None,
                   return_logits: bool = False, progress: ProgressFn | None = None,
                   init: torch.Tensor | None = None) -> SynthResult:
        """One batch of images of `labels`. `iterations` overrides the method's own step count for this batch."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- shared behaviour, overridable ------------------------------------------------------------------------------
    def validate_labels(self, labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(labels, dtype=torch.int64).flatten()
        if y.numel() == 0:  # one label per image: "no class ids" would misname it here
            raise InvalidRequestError("no labels: the image count must be >= 1")
        check_class_ids(self.card, y.tolist())
        return y

    min_iterations: ClassVar[int] = 1

    def request_iterations(self, iterations: int | None) -> int | None:
        """The step count a request (HTTP or job) runs at, given what it asked for; None: the method's default.

        Refuses a count the method cannot run, before the request shares a batch with others."""
        if iterations is not None and iterations < self.min_iterations:
            raise InvalidRequestError(f"iterations must be >= {self.min_iterations} for the {self.method!r} method, "
                                      f"got {iterations}")
        return iterations

    def warm_up(self, progress: ProgressFn | None = None) -> float:
        """Get ready to serve (a method with persistent state trains it here); returns the seconds it took."""
        return 0.0

    def batch_key(self, iterations: int | None) -> Hashable:
        """Requests whose keys are equal may share one batch (the batcher groups by it)."""
        return iterations

    def set_student(self, student: nn.Module | None, info: dict[str, Any] | None = None) -> None:
        """The student for adversarial terms (the trainer's latest, fed back); the next batch uses it."""
        self.objective.set_student(student)
        self.student_info = info

    def describe(self) -> dict[str, Any]:
        """What /v1/info and the metrics report about the method."""
        return {"method": self.method}

    def synthesize_classes(self, classes: Sequence[int], per_class: int, seed: int = 0,
                           iterations: int | None = None, return_logits: bool = False,
                           progress: ProgressFn | None = None) -> SynthResult:
        """k images for each class, in engine batches of at most `batch_size`; batch b uses seed + b.

        `progress` sees steps counted over all batches.
        """
        self.validate_labels(list(classes))
        batches = plan_batches(list(classes), per_class, self.config.batch_size)
        results = []
        for b, labels in enumerate(batches):
            batch_progress = None
            if progress is not None:
                def batch_progress(step: int, total: int, terms: dict[str, float], _b: int = b) -> None:
                    progress(_b * total + step, len(batches) * total, terms)
            results.append(self.synthesize(labels, seed=seed + b, iterations=iterations,
                                           return_logits=return_logits, progress=batch_progress))
        return SynthResult.concat(results)

    def __enter__(self) -> "Synthesizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
