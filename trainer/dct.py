"""The orthonormal 2-D DCT-II over a map's last two axes, and DC removal for ScaleKD's frequency view."""
from __future__ import annotations

import functools
import math

import torch


def dct_matrix(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, n] orthonormal DCT-II: row k is the k-th cosine basis, so `D @ x` transforms and `D.T @ X` inverts."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _shared_dct_matrix(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One matrix per size, device and dtype, built once: the loss transforms every step. Read-only."""
    return dct_matrix(n, device, dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """DCT-II of [..., H, W] over H and W."""
    h, w = x.shape[-2:]
    return _shared_dct_matrix(h, x.device, x.dtype) @ x @ _shared_dct_matrix(w, x.device, x.dtype).T


def idct2(c: torch.Tensor) -> torch.Tensor:
    """The inverse of `dct2` (the matrices are orthonormal, so it is their transpose)."""
    h, w = c.shape[-2:]
    return _shared_dct_matrix(h, c.device, c.dtype).T @ c @ _shared_dct_matrix(w, c.device, c.dtype)


def remove_dc(x: torch.Tensor) -> torch.Tensor:
    """[..., H, W] with its DCT's direct component zeroed: the map less its mean over H and W, computed as the
    frequency view is defined (transform, zero the DC coefficient, invert)."""
    keep = torch.ones(x.shape[-2:], device=x.device, dtype=x.dtype)
    keep[0, 0] = 0
    return idct2(dct2(x) * keep)
