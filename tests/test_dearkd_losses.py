"""DearKD loss terms and schedules against direct formulas."""
from __future__ import annotations

import math

import pytest
import torch

from shared.config import DearKDConfig
from trainer.losses import distillation_token_loss, stage1_loss, stage2_loss
from trainer.schedule import stage_at, student_lr

torch.manual_seed(0)


def smoothed_ce(logits: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    total = 0.0
    k = logits.shape[1]
    for i in range(len(y)):
        logp = logits[i].log_softmax(0)
        target = torch.full((k,), eps / k)
        target[y[i]] += 1 - eps
        total += -float((target * logp).sum())
    return total / len(y)


def test_hard_and_soft_distillation_match_formulas():
    s, t = torch.randn(5, 7), torch.randn(5, 7) * 2
    hard = -sum(float(s[i].log_softmax(0)[t[i].argmax()]) for i in range(5)) / 5
    assert float(distillation_token_loss(s, t, "hard", 1.0)) == pytest.approx(hard, rel=1e-5)
    with pytest.raises(ValueError, match="unknown KD kind"):
        distillation_token_loss(s, t, "medium", 1.0)


def test_soft_distillation_is_deits_by_default_and_batchmean_on_request():
    s, t = torch.randn(5, 7), torch.randn(5, 7) * 2
    temp = 3.0
    p_t, p_s = (t / temp).softmax(1), (s / temp).softmax(1)
    kl_sum = float((p_t * (p_t.log() - p_s.log())).sum())
    # DeiT: sum * T^2 / numel, i.e. over batch x classes.
    assert float(distillation_token_loss(s, t, "soft", temp)) == pytest.approx(kl_sum * temp ** 2 / 35, rel=1e-4)
    assert float(distillation_token_loss(s, t, "soft", temp, "batchmean")) == pytest.approx(kl_sum * temp ** 2 / 5,
                                                                                           rel=1e-4)
    assert DearKDConfig().soft_kd_reduction == "deit"
    cfg = DearKDConfig(kd="soft", temperature=temp, alpha=1.0, beta=0.0)
    total, terms = stage1_loss(s, s, torch.zeros(5, dtype=torch.long), t, [], cfg)
    assert float(total) == pytest.approx(kl_sum * temp ** 2 / 35, rel=1e-4)
    batchmean = cfg.model_copy(update={"soft_kd_reduction": "batchmean"})
    assert float(stage1_loss(s, s, torch.zeros(5, dtype=torch.long), t, [], batchmean)[0]) == pytest.approx(
        kl_sum * temp ** 2 / 5, rel=1e-4)
    with pytest.raises(ValueError, match="reduction"):
        distillation_token_loss(s, t, "soft", temp, "mean")


def test_stage1_is_the_weighted_sum():
    cfg = DearKDConfig(alpha=0.3, beta=2.0, label_smoothing=0.1, kd="hard")
    cls, dist, t = torch.randn(6, 10), torch.randn(6, 10), torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    a, b = torch.randn(6, 8, 4, 4), torch.randn(6, 8, 4, 4)
    feats = [((a - b) ** 2).mean(), ((a * 2 - b) ** 2).mean()]
    total, terms = stage1_loss(cls, dist, y, t, feats, cfg)
    hard = -sum(float(dist[i].log_softmax(0)[t[i].argmax()]) for i in range(6)) / 6
    expected = 0.7 * smoothed_ce(cls, y, 0.1) + 0.3 * hard + 2.0 * float(feats[0] + feats[1])
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(terms["ce"]) == pytest.approx(smoothed_ce(cls, y, 0.1), rel=1e-5)


def test_stage2_uses_labels_on_both_heads():
    cfg = DearKDConfig(label_smoothing=0.2)
    cls, dist = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 3, 4, 1])
    total, _ = stage2_loss(cls, dist, y, cfg)
    expected = 0.5 * smoothed_ce(cls, y, 0.2) + 0.5 * smoothed_ce(dist, y, 0.2)
    assert float(total) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("total,fraction,switch", [(100, 0.8, 80), (10, 0.5, 5), (7, 0.0, 0), (7, 1.0, 7)])
def test_stage_switch_happens_exactly_at_the_configured_step(total, fraction, switch):
    stages = [stage_at(s, total, fraction) for s in range(total)]
    assert stages == [1] * switch + [2] * (total - switch)


def test_one_warmup_cosine_curve_spans_both_stages():
    lrs = [student_lr(s, 100, 1e-3, 10, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warm-up, no reset at the switch
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1 + math.cos(math.pi * 45 / 90)) * (1e-3 - 1e-5))
