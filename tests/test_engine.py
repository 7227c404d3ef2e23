"""InversionEngine behaviour: frozen teacher, hook lifecycle, determinism, optimised paths, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from shared.config import SynthConfig
from shared.errors import InvalidRequestError
from shared.models.digits import DigitsCNN
from shared.teacher import Teacher, teacher_from_arch
from synth_service.batch_plan import plan_batches
from synth_service.engine import InversionEngine
from synth_service.teacher_objective import LOSS_TERMS

FAST = SynthConfig(batch_size=32, iterations=6, lr=0.1, bn_weight=1.0, first_bn_multiplier=10, tv_l2=1e-3, l2=0,
                   jitter=1, flip=False, diversity=1.0, boundary=1.0, margin=3.0)


def bn_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_teacher_is_frozen_and_gets_no_weight_gradients(digits_teacher):
    with InversionEngine(digits_teacher, FAST) as engine:
        engine.synthesize([0, 0, 1, 1], seed=0)
        assert all(not p.requires_grad and p.grad is None for p in engine.teacher.parameters())
        assert not engine.teacher.training


def test_hooks_are_removed_on_close_and_engines_do_not_leak(digits_teacher):
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in digits_teacher.model.modules())
    first = InversionEngine(digits_teacher, FAST)
    assert bn_hook_count(digits_teacher.model) == n_bn
    a = first.synthesize([1, 1, 2, 2], seed=5)
    first.close()
    assert bn_hook_count(digits_teacher.model) == 0
    with pytest.raises(RuntimeError, match="closed"):
        first.synthesize([1, 1], seed=0)
    with InversionEngine(digits_teacher, FAST) as second:
        assert bn_hook_count(digits_teacher.model) == n_bn  # not 2 * n_bn
        b = second.synthesize([1, 1, 2, 2], seed=5)
        x = torch.zeros(2, 1, 16, 16)
        _, _, bn_distances = second.objective._forward(x)
        assert len(bn_distances) == n_bn
    assert bn_hook_count(digits_teacher.model) == 0
    assert torch.equal(a.images, b.images)


def test_cpu_determinism_under_a_seed(digits_teacher):
    labels = [3, 3, 7, 7, 7]
    with InversionEngine(digits_teacher, FAST) as engine:
        r1 = engine.synthesize(labels, seed=11)
        r2 = engine.synthesize(labels, seed=11)
        r3 = engine.synthesize(labels, seed=12)
    assert torch.equal(r1.images, r2.images)
    assert r1.history == r2.history
    assert not torch.equal(r1.images, r3.images)


def test_output_contract(digits_teacher):
    labels = [9, 2, 2, 5, 5, 5, 0]  # any list, any length: labels are never tied to the batch size
    with InversionEngine(digits_teacher, FAST) as engine:
        r = engine.synthesize(labels, seed=0, return_logits=True)
    assert r.images.dtype == torch.uint8 and r.images.shape == (7, 1, 16, 16)
    assert r.labels.tolist() == labels
    assert r.teacher_top1.shape == r.teacher_confidence.shape == (7,)
    assert ((r.teacher_confidence >= 0) & (r.teacher_confidence <= 1)).all()
    assert r.logits.shape == (7, 10)
    assert torch.allclose(r.features.norm(dim=1), torch.ones(7), atol=1e-5)
    assert set(r.history) == set(LOSS_TERMS) and all(len(v) == FAST.iterations for v in r.history.values())
    assert set(r.per_image) == {"ce", "margin"}


def test_channels_last_computes_the_same_losses(digits_teacher):
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with InversionEngine(digits_teacher, FAST) as plain:
        loss_a, terms_a = plain.loss_terms(x, y)
    with InversionEngine(digits_teacher, FAST.model_copy(update={"channels_last": True})) as cl:
        loss_b, terms_b = cl.loss_terms(x.contiguous(memory_format=torch.channels_last), y)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-4)
    for k in terms_a:
        assert float(terms_b[k]) == pytest.approx(float(terms_a[k]), rel=1e-4, abs=1e-6), k


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", [{"amp": "bf16"}, {"amp": "bf16", "compile": True}, {"compile": True}])
def test_cuda_fast_paths_match_fp32(variant):
    teacher = teacher_from_arch("resnet18", num_classes=10, image_size=64)
    x = torch.randn(8, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    y = torch.arange(8, device="cuda") % 4
    base = FAST.model_copy(update={"amp": "off", "channels_last": False})
    with InversionEngine(teacher, base, device="cuda") as ref:
        _, ref_terms = ref.loss_terms(x, y)
    with InversionEngine(teacher, base.model_copy(update=variant), device="cuda") as fast:
        _, fast_terms = fast.loss_terms(x, y)
    tol = 5e-2 if variant.get("amp") == "bf16" else 1e-3
    for k in ("ce", "bn", "tv_l2", "l2", "diversity", "boundary"):
        assert float(fast_terms[k]) == pytest.approx(float(ref_terms[k]), rel=tol, abs=1e-3), k


def test_multi_resolution_schedule(digits_teacher):
    cfg = FAST.model_copy(update={"resolution_schedule": [(8, 4), (16, 3)]})
    with InversionEngine(digits_teacher, cfg) as engine:
        r = engine.synthesize([4, 4, 6, 6], seed=0)
        assert r.iterations == 7 and len(r.history["bn"]) == 7
        assert r.images.shape[-1] == 16  # the optimised images stay at full size
        scaled = engine.synthesize([4, 4], seed=0, iterations=14)
        assert scaled.iterations == 14


def test_adaptive_di_competition_needs_a_student(digits_teacher):
    # What the term does to the images: tests/test_synth_reference.py.
    with pytest.raises(InvalidRequestError, match="student"):
        InversionEngine(digits_teacher, FAST.model_copy(update={"competition": 1.0}))


def test_a_timm_teacher_by_name():
    teacher = teacher_from_arch("resnet18", num_classes=5, image_size=32)
    cfg = FAST.model_copy(update={"iterations": 2, "jitter": 2, "flip": True})
    with InversionEngine(teacher, cfg) as engine:
        r = engine.synthesize([0, 0, 4, 4], seed=0)
    assert r.images.shape == (4, 3, 32, 32)
    assert len(teacher.card.fingerprint) == 64


def test_unknown_class_ids_and_bad_counts_are_rejected(digits_teacher):
    with InversionEngine(digits_teacher, FAST) as engine:
        with pytest.raises(InvalidRequestError, match=r"unknown class id\(s\) \[10, 12\].*0\.\.9"):
            engine.synthesize([1, 10, 12], seed=0)
        with pytest.raises(InvalidRequestError, match="unknown class id"):
            engine.synthesize([-1], seed=0)
        with pytest.raises(InvalidRequestError, match="count must be >= 1"):
            engine.synthesize([], seed=0)
        with pytest.raises(InvalidRequestError, match="per-class count must be >= 1"):
            engine.synthesize_classes([1, 2], per_class=0)
        with pytest.raises(InvalidRequestError, match="per-class count must be >= 1"):
            engine.synthesize_classes([1, 2], per_class=-3)
        with pytest.raises(InvalidRequestError, match="iterations must be >= 1"):
            engine.synthesize([1, 1], iterations=0)


def test_config_errors_are_clear(digits_teacher):
    with pytest.raises(InvalidRequestError, match="bn_layer_weights has 2 entries"):
        InversionEngine(digits_teacher, FAST.model_copy(update={"bn_layer_weights": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="resolution"):
        SynthConfig(resolution_schedule=[(2, 10)])
    no_bn = Teacher(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)), digits_teacher.card)
    with pytest.raises(ValueError, match="no BatchNorm"):
        InversionEngine(no_bn, FAST)

    class ScaledLogits(DigitsCNN):  # forward() disagrees with forward_features/forward_head/get_classifier
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(InvalidRequestError, match="head protocol"):
        InversionEngine(Teacher(ScaledLogits(), digits_teacher.card), FAST)


@pytest.mark.parametrize("classes,per_class,batch", [(range(10), 30, 100), (range(10), 100, 100),
                                                     (range(10), 8, 100), (range(4), 7, 5), (range(1), 250, 100),
                                                     (range(1000), 3, 152), (range(3), 5, 4)])
def test_plan_batches_fills_batches_spreads_classes_and_keeps_pairs(classes, per_class, batch):
    batches = plan_batches(list(classes), per_class, batch)
    assert sorted(c for b in batches for c in b) == sorted(c for c in classes for _ in range(per_class))
    assert max(map(len, batches)) <= batch
    assert max(map(len, batches)) - min(map(len, batches)) <= 3  # near-equal, no runt batch
    assert len(batches) <= -(-len(classes) * per_class // batch) + 1
    for b in batches:
        assert all(b.count(c) >= 2 for c in set(b)), b
    if per_class >= 2 * len(batches):  # enough images: every batch sees every class
        assert all(set(b) == set(classes) for b in batches)


@pytest.mark.slow
def test_compiled_path_matches_plain_losses_on_cpu(digits_teacher):
    """torch.compile traces the BN hooks too: same loss terms, and a full synthesis runs."""
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with InversionEngine(digits_teacher, FAST) as plain:
        _, ref = plain.loss_terms(x, y)
    with InversionEngine(digits_teacher, FAST.model_copy(update={"compile": True})) as compiled:
        _, got = compiled.loss_terms(x, y)
        compiled.synthesize([0, 0, 1, 1], seed=0)
    for k in ref:
        assert float(got[k]) == pytest.approx(float(ref[k]), rel=1e-4, abs=1e-6), k
