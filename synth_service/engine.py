"""InversionEngine, the `di` method: DeepInversion + Adaptive-DI + BPID, optimising each batch's pixels against a
frozen teacher. Pure torch, no web code. See docs/architecture.md §3.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from shared.config import SynthConfig
from shared.errors import InvalidRequestError
from shared.teacher import Teacher
from synth_service.result import ProgressFn, SynthResult
from synth_service.synthesizer import Synthesizer, register_synthesizer
from synth_service.teacher_objective import LOSS_TERMS, TeacherObjective

def warmup_length(config: SynthConfig, phase_iters: int, scale: float = 1.0) -> int:
    """Warm-up steps of a phase of `phase_iters` steps; `scale` is how much a request's iterations scaled the phase.

    Fixed iterations (the reference's 100) scale with the phase, so a short request is not all warm-up.
    """
    if config.warmup_iterations is not None:
        return min(round(config.warmup_iterations * scale), phase_iters - 1)
    fraction = config.warmup_fraction if config.warmup_fraction is not None else 0.05
    return int(phase_iters * fraction)


def phase_jitter(jitter: int, res: int, size: int) -> int:
    """Roll limit in pixels at resolution `res`: floored as in the reference (30 at 224 px -> 15 at 112), >= 1."""
    return max(1, jitter * res // size) if jitter > 0 else 0


def inversion_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps then cosine to zero, within one phase."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


@register_synthesizer("di")
class InversionEngine(Synthesizer):
    """Owns a frozen teacher (and optional ADI student); inverts one batch of labels per `synthesize` call.

    Use as a context manager, or call `close()`: that removes the BN hooks from the teacher.
    """

    def __init__(self, teacher: Teacher, config: SynthConfig, device: torch.device | str = "cpu",
                 student: nn.Module | None = None, student_optional: bool = False,
                 log: Callable[[str], None] = lambda m: None):
        self.check_student(config, student, student_optional)
        self.card = teacher.card
        self.config = config
        self.objective = TeacherObjective(teacher, config, device=device, student=student)
        self.device = self.objective.device
        self.use_bf16 = self.objective.use_bf16
        self.channels_last = self.objective.channels_last
        self.verifier_card = self.objective.verifier_card

    @property
    def teacher(self) -> nn.Module:
        return self.objective.teacher

    @property
    def student(self) -> nn.Module | None:
        return self.objective.student

    def loss_terms(self, x_view: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective.loss_terms(x_view, y, self.objective.student)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "iterations": self.config.iterations,
                "resolution_schedule": self.config.phases(self.card.image_size),
                "student_step": (self.student_info or {}).get("step")}

    def close(self) -> None:
        self.objective.close()

    def synthesize(self, labels: Sequence[int] | torch.Tensor, seed: int = 0, iterations: int | None = None,
                   return_logits: bool = False, progress: ProgressFn | None = None,
                   init: torch.Tensor | None = None) -> SynthResult:
        """Invert one batch. `iterations` scales every phase of the schedule to that total.

        `init` (N, C, H, W) replaces the seeded starting noise, so coalesced requests keep their own seeds.
        """
        obj = self.objective
        if not obj.active:
            raise RuntimeError("this engine was closed")
        cfg, card = self.config, self.card
        student = obj.student  # one student for the whole batch, whatever a hot swap does meanwhile
        y = self.validate_labels(labels).to(self.device)
        phases = cfg.phases(card.image_size)
        if iterations is not None:
            if iterations < 1:
                raise InvalidRequestError(f"iterations must be >= 1, got {iterations}")
            total = sum(it for _, it in phases)
            phases = [(res, max(1, round(it * iterations / total))) for res, it in phases]
        total_iters = sum(it for _, it in phases)
        scale = 1.0 if iterations is None else iterations / sum(it for _, it in cfg.phases(card.image_size))

        gen = torch.Generator().manual_seed(seed)
        n, size = len(y), card.image_size
        # Noise drawn on the CPU so a seed gives the same start on any device.
        shape = (n, card.in_chans, size, size)
        if init is not None and tuple(init.shape) != shape:
            raise InvalidRequestError(f"init has shape {tuple(init.shape)}, expected {shape}")
        x = (init.detach().float().clone() if init is not None else torch.randn(shape, generator=gen)).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        best_x = x.detach().clone()
        best_loss = torch.full((), float("inf"), device=self.device)
        history = torch.zeros(total_iters, len(LOSS_TERMS), device=self.device)

        start, step = time.perf_counter(), 0
        for res, phase_iters in phases:
            jitter = phase_jitter(cfg.jitter, res, size)
            warmup = warmup_length(cfg, phase_iters, scale)
            optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas)  # fresh state per phase, as in DI
            for i in range(phase_iters):
                for group in optimizer.param_groups:
                    group["lr"] = inversion_lr(i, phase_iters, cfg.lr, warmup)
                view = obj.augment(x, res, jitter, gen)
                loss, terms = obj.loss_terms(view, y, student)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    history[step] = torch.stack([loss.detach()] + [terms[k].detach() for k in LOSS_TERMS[1:]])
                    if cfg.keep_best and res == size:
                        better = loss.detach() < best_loss
                        best_x = torch.where(better, x.detach(), best_x)
                        best_loss = torch.minimum(best_loss, loss.detach())
                optimizer.step()
                with torch.no_grad():
                    x.clamp_(min=obj.lo, max=obj.hi)
                step += 1
                if progress is not None and (step % cfg.log_every == 0 or step == total_iters):
                    row = history[step - 1].tolist()  # the only host sync, every log_every steps
                    progress(step, total_iters, dict(zip(LOSS_TERMS, row)))

        final_x = best_x if cfg.keep_best and torch.isfinite(best_loss) else x.detach()
        result = obj.finish(final_x, y, seed, total_iters, return_logits)
        result.history = {k: v for k, v in zip(LOSS_TERMS, history.t().cpu().tolist())}
        result.phases = [(res, it) for res, it in phases]
        result.seconds = time.perf_counter() - start
        return result
