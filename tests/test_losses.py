"""Each inversion loss term against a direct, loop-based formula on random inputs."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn

from synth_service.bn_hooks import BNStatsHooks
from synth_service.losses import (
    boundary_margin,
    intra_class_divergence,
    js_competition,
    l2_prior,
    memory_repulsion,
    total_variation,
)
from logit_kd import kd_loss

torch.manual_seed(0)


def test_total_variation_matches_direct_sums():
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    n, c, h, w = x.shape
    shifts = [(0, 1), (1, 0), (1, -1), (1, 1)]  # right, down, down-left, down-right neighbours
    l1, l2 = 0.0, 0.0
    for dy, dx in shifts:
        diffs = [float(x[b, ch, i, j] - x[b, ch, i + dy, j + dx])
                 for b in range(n) for ch in range(c) for i in range(h) for j in range(w)
                 if 0 <= i + dy < h and 0 <= j + dx < w]
        l1 += sum(abs(d) for d in diffs) / len(diffs)
        l2 += math.sqrt(sum(d * d for d in diffs))
    got_l1, got_l2 = total_variation(x)
    assert float(got_l1) == pytest.approx(l1, rel=1e-9)
    assert float(got_l2) == pytest.approx(l2, rel=1e-9)


def test_l2_prior_is_mean_image_norm():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    expected = sum(math.sqrt(float((x[i] ** 2).sum())) for i in range(4)) / 4
    assert float(l2_prior(x)) == pytest.approx(expected, rel=1e-9)


def test_bn_hook_distance_matches_direct_statistics():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.randn(3))
    bn.running_var.copy_(torch.rand(3) + 0.5)
    model = nn.Sequential(nn.Identity(), bn)
    hooks = BNStatsHooks(model)
    for shift in (0.0, 20.0):  # also a mean 40x the spread: the one-pass CPU statistics stay exact enough
        x = torch.randn(4, 3, 5, 5) * 0.5 + shift
        model(x)
        got = hooks.pop()
        values = x.double().permute(1, 0, 2, 3).reshape(3, -1)
        mean = values.mean(1)
        var = ((values - mean[:, None]) ** 2).mean(1)  # biased, as BN uses in training
        expected = (mean - bn.running_mean).norm() + (var - bn.running_var).norm()
        assert got.shape == (1,)
        assert float(got[0]) == pytest.approx(float(expected), rel=1e-5)
    hooks.remove()


def test_js_competition_matches_the_adi_reference_formula():
    # 1 - clamp(JS', 0, 1), JS' = 0.5 (KL(M||P) + KL(M||Q)) per image, averaged; P, Q, M clamped to [0.01, 0.99],
    # M taken from the unclamped P and Q.
    temp = 3.0
    t, s = torch.randn(5, 7, dtype=torch.float64) * 4, torch.randn(5, 7, dtype=torch.float64) * 4
    p, q = (t / temp).softmax(1), (s / temp).softmax(1)
    m = (p + q) / 2
    js = 0.0
    for i in range(5):
        for c in range(7):
            pc, qc, mc = (min(max(float(v[i, c]), 0.01), 0.99) for v in (p, q, m))
            js += 0.5 * (mc * math.log(mc / pc) + mc * math.log(mc / qc)) / 5
    assert 0 < js < 1  # inside the clamp, so the value tests the formula
    assert float(js_competition(t, s, temp)) == pytest.approx(1 - js, rel=1e-9)
    assert float(js_competition(t, t, temp)) == pytest.approx(1.0, abs=1e-9)
    # Confident, opposite predictions: JS' passes 1, the clamp binds and the term (and its gradient) is zero.
    far_t = torch.tensor([[30.0, 0.0]], requires_grad=True)
    far = js_competition(far_t, torch.tensor([[0.0, 30.0]]), 1.0)
    far.backward()
    assert float(far.detach()) == 0.0 and float(far_t.grad.abs().sum()) == 0.0


def test_intra_class_divergence_matches_pair_loop():
    f = torch.randn(9, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    fn = f / f.norm(dim=1, keepdim=True)
    pairs = [(i, j) for i, j in itertools.permutations(range(9), 2) if y[i] == y[j]]
    expected = -sum(float(((fn[i] - fn[j]) ** 2).sum()) for i, j in pairs) / len(pairs)
    assert float(intra_class_divergence(f, y)) == pytest.approx(expected, rel=1e-9)
    # No same-class pair: the term is zero, not NaN.
    assert float(intra_class_divergence(f[:3], torch.tensor([0, 1, 2]))) == 0.0


def test_memory_repulsion_matches_nearest_neighbour_loop():
    f = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 2, 4])
    bank = torch.nn.functional.normalize(torch.randn(7, 6, dtype=torch.float64), dim=1)
    bank_y = torch.tensor([0, 1, 1, 2, 2, 0, 3])
    fn = f.detach() / f.detach().norm(dim=1, keepdim=True)
    nearest = [min(float(((fn[i] - bank[j]) ** 2).sum()) for j in range(7) if bank_y[j] == y[i])
               for i in range(5) if (bank_y == y[i]).any()]  # class 4 has no neighbour in memory: left out
    loss = memory_repulsion(f, y, bank, bank_y)
    assert float(loss) == pytest.approx(-sum(nearest) / len(nearest), rel=1e-9)
    loss.backward()
    assert f.grad[4].abs().sum() == 0 and f.grad[0].abs().sum() > 0  # only images with a neighbour move
    assert float(memory_repulsion(f, y, bank[:0], bank_y[:0])) == 0.0
    # Inactive images (e.g. already near their class boundary) are neither counted nor pushed.
    f.grad = None
    active = torch.tensor([False, True, True, True, True])
    gated = memory_repulsion(f, y, bank, bank_y, active=active)
    assert float(gated) == pytest.approx(-sum(nearest[1:]) / len(nearest[1:]), rel=1e-9)
    gated.backward()
    assert f.grad[0].abs().sum() == 0 and f.grad[1].abs().sum() > 0


def test_boundary_margin_matches_hinge_loop():
    z = torch.randn(6, 5) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    m = 2.0
    expected = 0.0
    for i in range(6):
        other = max(float(z[i, c]) for c in range(5) if c != y[i])
        expected += max(0.0, m - (float(z[i, y[i]]) - other))
    assert float(boundary_margin(z, y, m)) == pytest.approx(expected / 6, rel=1e-6)


def test_kd_loss_matches_formula():
    s, t, temp = torch.randn(4, 10), torch.randn(4, 10), 4.0
    p_t, p_s = (t / temp).softmax(1), (s / temp).softmax(1)
    expected = float((p_t * (p_t.log() - p_s.log())).sum()) / 4 * temp ** 2
    assert float(kd_loss(s, t, temp)) == pytest.approx(expected, rel=1e-5)
