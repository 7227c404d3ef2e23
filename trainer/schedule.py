"""Step-based schedules shared by both DearKD stages: the stage switch and one warm-up + cosine LR curve."""
from __future__ import annotations

import math


def stage1_steps(total_steps: int, stage1_fraction: float) -> int:
    return round(total_steps * stage1_fraction)


def stage_at(step: int, total_steps: int, stage1_fraction: float) -> int:
    """1 while distilling, 2 from step `round(total * fraction)` on (steps count from 0)."""
    return 1 if step < stage1_steps(total_steps, stage1_fraction) else 2


def student_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up to base_lr, then cosine to min_lr over the remaining steps (one curve for both stages)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)
