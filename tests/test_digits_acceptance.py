"""End-to-end quality on real digits: teacher, synthetic images, a second-network check, BPID, KD transfer."""
from __future__ import annotations

import pytest
import torch

from helpers import accuracy
from shared.data.digits import load_digits_split
from shared.models import create_model
from synth_service.engine import InversionEngine
from synth_service.report import mean_diversity
from logit_kd import distill_logits
from trainer.teacher_train import evaluate

pytestmark = pytest.mark.usefixtures("all_cores")  # every test computes in this process alone


def test_digits_teacher_is_accurate(digits_teacher_run):
    # Its training time is printed, not asserted: wall time belongs to the benchmarks, not to a unit test.
    teacher, seconds = digits_teacher_run
    print(f"digits teacher: held-out top-1 {teacher.card.metrics['test_top1']:.4f} in {seconds:.1f}s")
    assert teacher.card.metrics["test_top1"] >= 0.97


@pytest.fixture(scope="module")
def synthetic_pool(digits_synthetic_pool):
    return digits_synthetic_pool


def test_teacher_recognises_its_synthetic_digits(synthetic_pool, digits_teacher):
    top1 = accuracy(digits_teacher.model, digits_teacher.card, synthetic_pool.images, synthetic_pool.labels)
    print(f"teacher top-1 on {len(synthetic_pool.labels)} synthetic digits: {top1:.3f}")
    assert sorted(synthetic_pool.labels.unique().tolist()) == list(range(10))
    assert top1 >= 0.95


def test_a_different_verifier_reads_the_class(synthetic_pool, digits_verifier):
    assert digits_verifier.card.arch != "digits_cnn"
    top1 = accuracy(digits_verifier.model, digits_verifier.card, synthetic_pool.images, synthetic_pool.labels)
    print(f"verifier ({digits_verifier.card.arch}) top-1 on synthetic digits: {top1:.3f} (chance 0.100)")
    assert top1 >= 0.20


def test_bn_statistics_distance_falls_fivefold(synthetic_pool):
    bn = synthetic_pool.history["bn"]
    print(f"BN distance {bn[0]:.3f} -> {bn[-1]:.3f} ({bn[0] / bn[-1]:.1f}x)")
    assert bn[0] / bn[-1] >= 5


def test_student_distilled_on_synthetic_digits_only_transfers(synthetic_pool, digits_teacher, digits_settings):
    card = digits_teacher.card
    student = create_model("digits_cnn_small", num_classes=10, in_chans=1)
    distill_logits(student, digits_teacher.model, synthetic_pool.images, card.mean, card.std, epochs=60)
    split = load_digits_split(digits_settings.data.digits_size)
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    top1 = evaluate(student, split.x_test, split.y_test, mean, std)
    print(f"KD student on {len(synthetic_pool.labels)} synthetic digits: {top1:.3f} on real held-out digits")
    assert top1 >= 0.85


def test_kd_on_noise_does_not_transfer(digits_teacher, digits_settings):
    """The control for the test above: the same KD on uniform noise stays near chance."""
    card = digits_teacher.card
    noise = torch.randint(0, 256, (500, 1, 16, 16), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    student = create_model("digits_cnn_small", num_classes=10, in_chans=1)
    distill_logits(student, digits_teacher.model, noise, card.mean, card.std, epochs=20)
    split = load_digits_split(digits_settings.data.digits_size)
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    assert evaluate(student, split.x_test, split.y_test, mean, std) < 0.4


def test_bpid_raises_intra_class_diversity(digits_teacher, digits_settings):
    on = digits_settings.synth
    assert on.diversity > 0 and on.boundary > 0
    off = on.model_copy(update={"diversity": 0.0, "boundary": 0.0})
    labels = [c for c in range(10) for _ in range(8)]
    results = {}
    for name, cfg in (("off", off), ("on", on)):
        with InversionEngine(digits_teacher, cfg) as engine:
            r = engine.synthesize(labels, seed=3)
        results[name] = (mean_diversity(r.features, r.labels),
                         accuracy(digits_teacher.model, digits_teacher.card, r.images, r.labels))
    (div_off, acc_off), (div_on, acc_on) = results["off"], results["on"]
    rise = div_on / div_off - 1
    print(f"BPID intra-class feature distance {div_off:.4f} -> {div_on:.4f} (+{100 * rise:.0f}%), "
          f"teacher top-1 {acc_off:.3f} -> {acc_on:.3f}")
    assert rise >= 0.15
    assert acc_on >= 0.95
