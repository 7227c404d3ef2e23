"""Plain logit KD (Hinton) from a teacher into a student on a fixed pool of images: the baseline transfer check."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.teacher_train import random_crop_flip


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_T || p_S) at temperature T, scaled by T^2 so gradients keep their size across T."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature ** 2


def distill_logits(student: nn.Module, teacher: nn.Module, images: torch.Tensor, mean: tuple[float, ...],
                   std: tuple[float, ...], epochs: int = 60, batch_size: int = 64, lr: float = 3e-3,
                   temperature: float = 4.0, crop_padding: int = 1, flip: bool = False, mixup: float = 0.0,
                   seed: int = 0, device: torch.device | str = "cpu",
                   log: Callable[[str], None] | None = None) -> nn.Module:
    """Train `student` to match the frozen `teacher` on augmented views of `images` (uint8, N×C×H×W).

    The teacher labels each augmented (and optionally mixed) view itself, so no stored labels are used.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = student.to(device).train()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    x_all = images.to(device).float().div_(255.0)
    steps = max(1, len(x_all) // batch_size)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    for epoch in range(epochs):
        perm = torch.randperm(len(x_all), generator=gen).to(device)
        total = torch.zeros((), device=device)
        for i in range(steps):
            xb = random_crop_flip(x_all[perm[i * batch_size:(i + 1) * batch_size]], crop_padding, flip, gen)
            if mixup > 0:
                lam = torch.distributions.Beta(mixup, mixup).sample().to(device)
                xb = lam * xb + (1 - lam) * xb.flip(0)
            xb = (xb - m) / s
            with torch.no_grad():
                t_logits = teacher(xb)
            loss = kd_loss(student(xb), t_logits, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        if log is not None and (epoch + 1) % max(1, epochs // 5) == 0:
            log(f"kd epoch {epoch + 1}/{epochs} loss {total.item() / steps:.4f}")
    return student.eval()
