"""The involution operator against an unfold-based reference, and the RedNet-style nets built on it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.models import create_model
from shared.models.involution import Involution2d, involution


def unfold_reference(x: torch.Tensor, kernels: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """The operator as the paper writes it: every K x K neighbourhood unfolded, weighted by its pixel's kernel."""
    b, c, h, w = x.shape
    h_out, w_out = kernels.shape[-2:]
    groups = kernels.shape[1] // (k * k)
    patches = F.unfold(x, k, padding=k // 2, stride=stride).view(b, groups, c // groups, k * k, h_out, w_out)
    return (kernels.view(b, groups, 1, k * k, h_out, w_out) * patches).sum(dim=3).view(b, c, h_out, w_out)


@pytest.mark.parametrize("k,stride,groups,size", [(3, 1, 1, 8), (5, 1, 4, 9), (7, 2, 2, 12), (5, 2, 8, 7)])
def test_involution_matches_the_unfold_reference(k, stride, groups, size):
    g = torch.Generator().manual_seed(k * 100 + size)
    x = torch.randn(2, 16, size, size, generator=g, dtype=torch.float64)
    out_size = (size - 1) // stride + 1
    kernels = torch.randn(2, groups * k * k, out_size, out_size, generator=g, dtype=torch.float64)
    torch.testing.assert_close(involution(x, kernels, k, stride), unfold_reference(x, kernels, k, stride))


@pytest.mark.parametrize("k,stride,groups,size", [(3, 1, 1, 6), (5, 2, 4, 7)])
def test_the_hand_written_backward_matches_autograd_of_the_reference(k, stride, groups, size):
    g = torch.Generator().manual_seed(k + size)
    x = torch.randn(2, 8, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    out_size = (size - 1) // stride + 1
    kernels = torch.randn(2, groups * k * k, out_size, out_size, generator=g, dtype=torch.float64,
                          requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: involution(a, b, k, stride), (x, kernels))
    upstream = torch.randn(2, 8, out_size, out_size, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(involution(x, kernels, k, stride), (x, kernels), upstream)
    reference = torch.autograd.grad(unfold_reference(x, kernels, k, stride), (x, kernels), upstream)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def test_mixed_dtypes_under_bf16_autocast_give_gradients_in_each_inputs_dtype():
    layer = Involution2d(16, kernel_size=3)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels = layer.span(layer.reduce(x))  # bf16 from the 1x1 convs, against an fp32 input
        kernels.retain_grad()
        out = involution(x, kernels, 3)
    assert kernels.dtype == torch.bfloat16 and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.float32 and kernels.grad.dtype == torch.bfloat16
    assert layer.span.weight.grad.abs().sum() > 0


def test_a_kernel_shared_by_every_pixel_and_channel_is_a_depthwise_convolution():
    x = torch.randn(1, 6, 10, 10, dtype=torch.float64)
    kernel = torch.randn(3, 3, dtype=torch.float64)
    kernels = kernel.reshape(1, 9, 1, 1).expand(1, 9, 10, 10)  # one group, the same kernel everywhere
    depthwise = F.conv2d(x, kernel.expand(6, 1, 3, 3), padding=1, groups=6)
    torch.testing.assert_close(involution(x, kernels, 3), depthwise)


def test_gradients_reach_the_input_and_the_kernel_generator():
    layer = Involution2d(16, kernel_size=5, stride=2, group_channels=4)
    x = torch.randn(3, 16, 9, 9, requires_grad=True)
    out = layer(x)
    assert out.shape == (3, 16, 5, 5)
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0 and layer.span.weight.grad.abs().sum() > 0


def test_kernels_that_do_not_fit_are_refused():
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(ValueError, match="do not fit 8 channels"):
        involution(x, torch.randn(1, 3 * 9, 6, 6), 3)
    with pytest.raises(ValueError, match="at stride 2"):
        involution(x, torch.randn(1, 9, 6, 6), 3, stride=2)
    with pytest.raises(ValueError, match="group_channels"):
        Involution2d(12, group_channels=8)


@pytest.mark.parametrize("name,chans,size", [("rednet_digits", 1, 16), ("rednet_cifar", 3, 32)])
def test_rednets_classify_and_keep_batchnorm_for_inversion(name, chans, size):
    model = create_model(name, num_classes=10, in_chans=chans).eval()
    x = torch.randn(2, chans, size, size)
    assert model(x).shape == (2, 10)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= 8
    assert sum(isinstance(m, Involution2d) for m in model.modules()) >= 3
