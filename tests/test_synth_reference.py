"""Where the synthesis follows the DeepInversion / Adaptive-DI reference: multi-resolution jitter, warm-up length,
the competition term's effect, and the report's BN-distance fall (docs/configuration.md, `synth`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from shared.config import Settings, SynthConfig
from synth_service.engine import InversionEngine
from synth_service.report import build_report


def spy_views(engine: InversionEngine, monkeypatch) -> list[torch.Tensor]:
    """Every view the loop hands to the loss, in order."""
    views, loss_terms = [], engine.objective.loss_terms

    def spy(view, y, student=None):
        views.append(view.detach().clone())
        return loss_terms(view, y, student)

    monkeypatch.setattr(engine.objective, "loss_terms", spy)
    return views


def integer_shift(view: torch.Tensor, base: torch.Tensor, limit: int) -> tuple[int, int] | None:
    for dx in range(-limit, limit + 1):
        for dy in range(-limit, limit + 1):
            if torch.allclose(torch.roll(base, shifts=(dx, dy), dims=(2, 3)), view, atol=1e-4):
                return dx, dy
    return None


def test_low_resolution_phase_pools_first_then_rolls_by_half_the_jitter(digits_teacher, monkeypatch):
    # lr so small that the images stay at their start: every view is then a whole-pixel roll of the pooled start.
    cfg = SynthConfig(batch_size=4, resolution_schedule=[(8, 24), (16, 4)], lr=1e-7, jitter=4, flip=False,
                      keep_best=False)
    with InversionEngine(digits_teacher, cfg) as engine:
        lo, hi = engine.objective.lo, engine.objective.hi
        start = lo + (hi - lo) * torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        views = spy_views(engine, monkeypatch)
        engine.synthesize([0, 0, 1, 1], seed=3, init=start)
    low, full = views[:24], views[24:]
    assert all(v.shape[-1] == 8 for v in low) and all(v.shape[-1] == 16 for v in full)
    low_shifts = [integer_shift(v, F.avg_pool2d(start, 2), 4) for v in low]
    assert None not in low_shifts, "a low-resolution view is not a whole-pixel roll of the pooled image"
    assert max(max(abs(dx), abs(dy)) for dx, dy in low_shifts) == 2  # jitter 4 at 16 px -> 2 px at 8 px
    full_shifts = [integer_shift(v, start, 4) for v in full]
    assert None not in full_shifts


@pytest.mark.parametrize("jitter,res,size,expected", [(30, 112, 224, 15), (31, 112, 224, 15), (30, 224, 224, 30),
                                                      (1, 8, 16, 1), (3, 8, 16, 1), (0, 8, 16, 0)])
def test_phase_jitter_floors_like_the_reference_and_keeps_one_pixel(jitter, res, size, expected):
    from synth_service.engine import phase_jitter

    assert phase_jitter(jitter, res, size) == expected


def test_warmup_in_iterations_is_validated():
    assert SynthConfig(iterations=500, warmup_iterations=100).warmup_iterations == 100
    with pytest.raises(ValidationError, match="either synth.warmup_iterations or synth.warmup_fraction"):
        SynthConfig(iterations=500, warmup_iterations=100, warmup_fraction=0.1)
    with pytest.raises(ValidationError, match=r"warmup_iterations \(100\) must be shorter than every phase"):
        SynthConfig(resolution_schedule=[(112, 2000), (224, 100)], warmup_iterations=100)
    # A dumped config loads back: the unset warm-up stays unset.
    cfg = SynthConfig(iterations=500, warmup_iterations=100)
    assert SynthConfig.model_validate(cfg.model_dump()) == cfg


def test_imagenet_preset_warms_up_for_100_iterations_in_each_phase():
    from synth_service.engine import inversion_lr, warmup_length

    cfg = Settings.load("imagenet").synth
    assert cfg.resolution_schedule == [(112, 2000), (224, 1000)]
    for _, iters in cfg.phases(224):
        warmup = warmup_length(cfg, iters)
        assert warmup == 100
        lrs = [inversion_lr(i, iters, cfg.lr, warmup) for i in range(iters)]
        assert lrs[0] == pytest.approx(cfg.lr / 100) and lrs[99] == pytest.approx(cfg.lr)
        assert lrs[100] == pytest.approx(cfg.lr) and lrs[-1] < 1e-3 * cfg.lr
    # Scaling a request's iterations scales the warm-up with its phase; the fraction still works alone.
    assert warmup_length(cfg, 67, scale=67 / 1000) == 7
    assert warmup_length(SynthConfig(iterations=1000), 1000) == 50


def teacher_student_js(teacher, student, images: torch.Tensor) -> tuple[float, float]:
    """Mean Jensen-Shannon divergence (nats) and argmax disagreement between teacher and student on uint8 images."""
    c = teacher.card
    x = (images.float() / 255 - torch.tensor(c.mean).view(1, -1, 1, 1)) / torch.tensor(c.std).view(1, -1, 1, 1)
    with torch.no_grad():
        p, q = teacher.model(x).softmax(1), student(x).softmax(1)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(1)  # noqa: E731
    return float((0.5 * kl(p, m) + 0.5 * kl(q, m)).mean()), float((p.argmax(1) != q.argmax(1)).float().mean())


def test_competition_term_drives_teacher_and_student_apart(digits_teacher, digits_verifier):
    student = digits_verifier.model  # another architecture, trained separately on the same digits
    labels = [c for c in range(10) for _ in range(2)]
    base = SynthConfig(batch_size=20, iterations=30, lr=0.1, bn_weight=1.0, tv_l2=1e-3, l2=0.0, jitter=1, flip=False)
    results = {}
    for weight in (0.0, 10.0):
        with InversionEngine(digits_teacher, base.model_copy(update={"competition": weight}),
                             student=student) as engine:
            results[weight] = engine.synthesize(labels, seed=0)
    js_plain, off_plain = teacher_student_js(digits_teacher, student, results[0.0].images)
    js_adi, off_adi = teacher_student_js(digits_teacher, student, results[10.0].images)
    print(f"teacher-student JS {js_plain:.3f} -> {js_adi:.3f}, argmax disagreement {off_plain:.2f} -> {off_adi:.2f}")
    assert js_adi > js_plain + 0.05
    assert off_adi >= off_plain
    assert results[0.0].history["competition"] == [0.0] * 30  # weight 0: the term is not even computed


def test_report_bn_fall_is_measured_within_the_full_resolution_phase(digits_teacher):
    cfg = SynthConfig(batch_size=4, resolution_schedule=[(8, 4), (16, 5)], lr=0.1, bn_weight=1.0, jitter=1,
                      flip=False)
    with InversionEngine(digits_teacher, cfg) as engine:
        result = engine.synthesize([0, 0, 1, 1], seed=0)
    bn = result.history["bn"]
    report = build_report(result, digits_teacher.card, {})
    assert report["bn_distance_first"] == bn[4] and report["bn_distance_last"] == bn[8]
    assert report["bn_distance_fall"] == pytest.approx(bn[4] / bn[8])
    assert report["bn_distance_phase"]["resolution"] == 16
    assert "full-resolution" in report["bn_distance_phase"]["description"]
