"""SynthResult: what every synthesis method returns for one batch of labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

ProgressFn = Callable[[int, int, dict[str, float]], None]  # (step, total steps, loss terms)


@dataclass
class SynthResult:
    """One engine batch. Tensors are on the CPU; images are uint8 in the teacher's pixel space."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64 target classes
    teacher_top1: torch.Tensor  # (N,) int64 teacher prediction on the final images
    teacher_confidence: torch.Tensor  # (N,) teacher probability of the target class
    teacher_margin: torch.Tensor  # (N,) target logit minus the best other logit
    features: torch.Tensor  # (N, D) L2-normalised penultimate teacher features
    final_terms: dict[str, float]  # batch loss terms on the final (un-jittered) images
    history: dict[str, list[float]]  # per-iteration loss terms (on the jittered views)
    seconds: float
    iterations: int
    seed: int
    logits: torch.Tensor | None = None  # (N, K) fp32, when requested
    per_image: dict[str, torch.Tensor] = field(default_factory=dict)  # per-image final loss terms
    phases: list[tuple[int, int]] = field(default_factory=list)  # (resolution, iterations) run, in history order
    verifier_top1: torch.Tensor | None = None  # (N,) verifier prediction on the final uint8 images, when configured
    verifier_features: torch.Tensor | None = None  # (N, D') L2-normalised penultimate verifier features

    def select(self, start: int, stop: int) -> "SynthResult":
        """Images start..stop of this batch, with the batch-level terms and history shared."""
        part = lambda t: t[start:stop] if t is not None else None  # noqa: E731
        return SynthResult(
            images=part(self.images), labels=part(self.labels), teacher_top1=part(self.teacher_top1),
            teacher_confidence=part(self.teacher_confidence), teacher_margin=part(self.teacher_margin),
            features=part(self.features), final_terms=self.final_terms, history=self.history,
            seconds=self.seconds, iterations=self.iterations, seed=self.seed, logits=part(self.logits),
            per_image={k: part(v) for k, v in self.per_image.items()}, phases=self.phases,
            verifier_top1=part(self.verifier_top1), verifier_features=part(self.verifier_features),
        )

    @staticmethod
    def concat(results: Sequence["SynthResult"]) -> "SynthResult":
        first = results[0]
        cat = lambda name: torch.cat([getattr(r, name) for r in results])  # noqa: E731
        n = [len(r.labels) for r in results]
        # Batch-level terms are averaged weighted by batch size.
        final = {k: sum(r.final_terms[k] * m for r, m in zip(results, n)) / sum(n) for k in first.final_terms}
        return SynthResult(
            images=cat("images"), labels=cat("labels"), teacher_top1=cat("teacher_top1"),
            teacher_confidence=cat("teacher_confidence"), teacher_margin=cat("teacher_margin"),
            features=cat("features"), final_terms=final,
            history={k: [sum(r.history[k][i] * m for r, m in zip(results, n)) / sum(n)
                         for i in range(len(first.history[k]))] for k in first.history},
            seconds=sum(r.seconds for r in results), iterations=first.iterations, seed=first.seed,
            logits=cat("logits") if first.logits is not None else None,
            per_image={k: torch.cat([r.per_image[k] for r in results]) for k in first.per_image},
            phases=first.phases,
            verifier_top1=cat("verifier_top1") if first.verifier_top1 is not None else None,
            verifier_features=cat("verifier_features") if first.verifier_features is not None else None,
        )
