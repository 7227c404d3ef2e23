"""DearKD losses: stage 1 distils logits and early features; stage 2 trains on labels alone.

See docs/architecture.md §4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.config import DearKDConfig


def distillation_token_loss(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                            temperature: float, reduction: str = "deit") -> torch.Tensor:
    """DeiT's distillation-token term: hard = CE to the teacher's argmax; soft = KL at T, scaled by T^2.

    Soft `reduction`: "deit" divides the summed KL by batch x classes, as DeiT does; "batchmean" by the batch only,
    which is `classes` times larger (a weight tuned for one is off by that factor for the other)."""
    if kind == "hard":
        return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    if kind == "soft":
        log_p_s = F.log_softmax(dist_logits / temperature, dim=1)
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) * temperature ** 2
        if reduction == "deit":
            return kl / dist_logits.numel()
        if reduction == "batchmean":
            return kl / dist_logits.shape[0]
        raise ValueError(f"unknown soft KD reduction {reduction!r}: 'deit' or 'batchmean'")
    raise ValueError(f"unknown KD kind {kind!r}: 'hard' or 'soft'")


def ensemble_target(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[M, B, K] member logits -> [B, K] logits whose softmax at T is the members' averaged softmax at T, so one
    distillation token learns the ensemble's averaged soft targets (hard KD: the argmax of that average).
    One member is returned as it is."""
    if logits.shape[0] == 1:
        return logits[0]
    probs = F.softmax(logits / temperature, dim=-1).mean(dim=0)
    return temperature * probs.clamp_min(1e-12).log()


def stage1_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: torch.Tensor, feature_terms: list[torch.Tensor],
                cfg: DearKDConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1-a)·CE_ls(cls, y) + a·KD(dist, T) + b·sum of the aligned early-feature MSEs.

    Several distillation tokens ([T, B, K] dist logits) each distil their own teacher's logits ([T, B, K]); KD is
    their mean."""
    ce = F.cross_entropy(cls_logits, labels, label_smoothing=cfg.label_smoothing)
    if dist_logits.ndim == 3:
        kd = torch.stack([distillation_token_loss(d, t, cfg.kd, cfg.temperature, cfg.soft_kd_reduction)
                          for d, t in zip(dist_logits, teacher_logits, strict=True)]).mean()
    else:
        kd = distillation_token_loss(dist_logits, teacher_logits, cfg.kd, cfg.temperature, cfg.soft_kd_reduction)
    feat = torch.stack(feature_terms).sum() if feature_terms else cls_logits.new_zeros(())
    total = (1 - cfg.alpha) * ce + cfg.alpha * kd + cfg.beta * feat
    return total, {"ce": ce.detach(), "kd": kd.detach(), "feature": feat.detach()}


def stage2_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, labels: torch.Tensor,
                cfg: DearKDConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """No teacher: both heads learn the labels, ½·CE_ls(cls, y) + ½·CE_ls(dist, y) (several distillation heads: the
    mean of theirs)."""
    ce_cls = F.cross_entropy(cls_logits, labels, label_smoothing=cfg.label_smoothing)
    dist = dist_logits if dist_logits.ndim == 3 else dist_logits[None]
    ce_dist = torch.stack([F.cross_entropy(d, labels, label_smoothing=cfg.label_smoothing) for d in dist]).mean()
    return 0.5 * ce_cls + 0.5 * ce_dist, {"ce": ce_cls.detach(), "ce_dist": ce_dist.detach()}
