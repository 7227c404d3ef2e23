"""Inversion loss terms (docs/architecture.md §3). All take and return fp32 tensors; none syncs with the host."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def total_variation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TV-L1 and TV-L2 over 4 directions (horizontal, vertical, two diagonals).

    As in the reference: L1 is the mean absolute difference, L2 the Frobenius norm over the batch, each summed over
    the directions, so published coefficients carry over.
    """
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )
    tv_l1 = sum(d.abs().mean() for d in diffs)
    tv_l2 = sum(torch.linalg.vector_norm(d) for d in diffs)
    return tv_l1, tv_l2


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """Mean over images of each image's L2 norm."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).mean()


def bn_statistics_distance(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
                           running_var: torch.Tensor) -> torch.Tensor:
    """One BN layer's term: ||mu - RM||_2 + ||var - RV||_2 (biased batch variance)."""
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def js_competition(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Adaptive-DI term 1 - clamp(JS', 0, 1): minimising it seeks images the teacher and student disagree on.

    JS' follows the ADI reference rather than the textbook divergence, so its a_c values carry over: the mean over
    images of 0.5 (KL(M‖P) + KL(M‖Q)), with M = (P + Q) / 2 and P, Q, M clamped to [0.01, 0.99]. JS' can pass 1,
    so the clamp binds on confident, opposite predictions (docs/configuration.md, `synth.competition`).
    """
    p = F.softmax(teacher_logits / temperature, dim=1)
    q = F.softmax(student_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    log_m = m.log()
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    kl_mp = (m * (log_m - p.log())).sum(dim=1)
    kl_mq = (m * (log_m - q.log())).sum(dim=1)
    js = 0.5 * (kl_mp + kl_mq).mean()
    return 1.0 - js.clamp(0.0, 1.0)


def intra_class_divergence(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BPID L_div: minus the mean squared distance between L2-normalised features of same-class pairs (i != j).

    Zero when the batch has no same-class pair.
    """
    f = F.normalize(features, dim=1)
    sq_dist = (2.0 - 2.0 * f @ f.t()).clamp_min(0.0)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    pairs = same.sum()
    return -(sq_dist * same).sum() / pairs.clamp_min(1)


def memory_repulsion(features: torch.Tensor, labels: torch.Tensor, memory: torch.Tensor,
                     memory_labels: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """Minus the mean squared distance from each L2-normalised feature to its nearest same-class `memory` feature.

    Earlier batches' features (unit length, detached) act as the neighbours to move away from, so a persistent
    generator keeps covering new ground across loops instead of redrawing what it already made. `active` (a bool per
    image) limits the push to some images, e.g. those still inside their class by the BPID margin. Zero when no
    active image has a same-class neighbour in memory.
    """
    if not len(memory):
        return features.new_zeros(())
    f = F.normalize(features, dim=1)
    sq_dist = (2.0 - 2.0 * f @ memory.t()).clamp_min(0.0)
    same = labels[:, None] == memory_labels[None, :]
    nearest = sq_dist.masked_fill(~same, float("inf")).amin(dim=1)
    has = same.any(dim=1) if active is None else same.any(dim=1) & active
    return -(nearest[has]).sum() / has.sum().clamp_min(1)


def target_lead(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image: the target logit minus the best other class's logit (negative when misclassified)."""
    target = logits.gather(1, labels[:, None]).squeeze(1)
    return target - logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)


def boundary_margin(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """BPID L_bp: mean hinge on the target logit's lead over the best other class, kept at least `margin`."""
    return F.relu(margin - target_lead(logits, labels)).mean()
