"""Involution (Li et al., CVPR 2021): convolution's inverse design. The kernel is generated at each pixel from that
pixel's own features and shared by the channels of a group, so it is spatially specific and channel-agnostic where a
convolution is spatially agnostic and channel-specific."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def involution(x: torch.Tensor, kernels: torch.Tensor, kernel_size: int, stride: int = 1) -> torch.Tensor:
    """out[b, c, i, j] = sum over (u, v) of kernels[b, g(c), u, v, i, j] * x_padded[b, c, s*i + u, s*j + v].

    `kernels` is (B, G * K * K, H_out, W_out); channel c belongs to group g(c) = c // (C / G). Computed as a sum of
    K * K strided views of the padded input, each scaled per pixel: memory stays that of the input, where an unfold
    would hold K * K copies of it.
    """
    b, c, h, w = x.shape
    k, s = kernel_size, stride
    h_out, w_out = kernels.shape[-2:]
    groups = kernels.shape[1] // (k * k)
    if kernels.shape[1] != groups * k * k or c % groups:
        raise ValueError(f"kernels of {kernels.shape[1]} channels do not fit {c} channels with K={k}")
    if (h_out, w_out) != ((h - 1) // s + 1, (w - 1) // s + 1) or k % 2 == 0:
        raise ValueError(f"kernels of size {(h_out, w_out)} do not fit a {h}x{w} input at stride {s} and odd K={k}")
    return _Involution.apply(x, kernels, k, s, groups)


def _taps(k: int, s: int, h_out: int, w_out: int):
    """(tap index, the padded input's strided view that the tap weighs) for each of the K * K taps."""
    for u in range(k):
        for v in range(k):
            yield u * k + v, (Ellipsis, slice(u, u + s * (h_out - 1) + 1, s), slice(v, v + s * (w_out - 1) + 1, s))


class _Involution(torch.autograd.Function):
    """In-place accumulation over the taps, and a hand-written backward: autograd of the same loop allocates a
    padded-size gradient per tap, which made it 2-6x slower on the CPU (RedNet training is mostly this op)."""

    @staticmethod
    def forward(ctx, x, kernels, k: int, s: int, groups: int):
        b, c, h, w = x.shape
        h_out, w_out = kernels.shape[-2:]
        dtype = torch.result_type(x, kernels)
        padded = F.pad(x.to(dtype), (k // 2,) * 4).view(b, groups, c // groups, h + k - 1, w + k - 1)
        weights = kernels.to(dtype).view(b, groups, 1, k * k, h_out, w_out)
        out = torch.zeros(b, groups, c // groups, h_out, w_out, dtype=dtype, device=x.device)
        for tap, view in _taps(k, s, h_out, w_out):
            out.addcmul_(padded[view], weights[:, :, :, tap])
        ctx.save_for_backward(padded, weights)
        ctx.geometry = (k, s, h, w, x.dtype, kernels.dtype)
        return out.view(b, c, h_out, w_out)

    @staticmethod
    def backward(ctx, grad_out):
        padded, weights = ctx.saved_tensors
        k, s, h, w, x_dtype, kernels_dtype = ctx.geometry
        b, groups, group_channels = padded.shape[:3]
        h_out, w_out = grad_out.shape[-2:]
        grad = grad_out.reshape(b, groups, group_channels, h_out, w_out).to(padded.dtype)
        grad_x = grad_kernels = None
        if ctx.needs_input_grad[0]:
            grad_padded = torch.zeros_like(padded)
            for tap, view in _taps(k, s, h_out, w_out):
                grad_padded[view].addcmul_(grad, weights[:, :, :, tap])
            p = k // 2
            grad_x = grad_padded.view(b, groups * group_channels, h + 2 * p, w + 2 * p)[..., p:p + h, p:p + w]
            grad_x = grad_x.to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_kernels = torch.empty(b, groups, k * k, h_out, w_out, dtype=padded.dtype, device=padded.device)
            for tap, view in _taps(k, s, h_out, w_out):
                torch.sum(grad * padded[view], dim=2, out=grad_kernels[:, :, tap])
            grad_kernels = grad_kernels.view(b, groups * k * k, h_out, w_out).to(kernels_dtype)
        return grad_x, grad_kernels, None, None, None


class Involution2d(nn.Module):
    """Kernels from the input: (average-pool by the stride), 1x1 reduce + BN + ReLU, 1x1 span to G * K * K."""

    def __init__(self, channels: int, kernel_size: int = 5, stride: int = 1, group_channels: int = 8,
                 reduction: int = 4):
        super().__init__()
        if channels % group_channels:
            raise ValueError(f"{channels} channels are not a multiple of group_channels {group_channels}")
        self.kernel_size, self.stride = kernel_size, stride
        self.groups = channels // group_channels
        mid = max(channels // reduction, 4)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.reduce = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                    nn.ReLU(inplace=True))
        self.span = nn.Conv2d(mid, self.groups * kernel_size ** 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return involution(x, self.span(self.reduce(self.pool(x))), self.kernel_size, self.stride)
