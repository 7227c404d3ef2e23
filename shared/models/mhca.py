"""MHCA: multi-head self-attention plus a learnable per-head locality bias (docs/architecture.md §4).

    logits_h(q, k) = (q·k)/sqrt(d_h) + b_h(q, k)
    b_h(q, k)      = -softplus(alpha_h) * ||delta(q, k) - Delta_h||^2   for two patch tokens
                   = 0                                                  in rows/columns of prefix (cls/dist) tokens

delta = key grid position - query grid position, as (dy, dx). With softplus(alpha_h) large and the content term
off, head h attends only to the patch at offset Delta_h: one tap of a convolution (Cordonnier et al. 2020, Thm. 1).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import maybe_add_mask, resolve_self_attn_mask

# A 3x3 window, centre first, then the 4-neighbours, then the diagonals, as (dy, dx).
WINDOW_3X3: tuple[tuple[int, int], ...] = (
    (0, 0), (0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, -1), (-1, 1))

# softplus(alpha) at init. At 1, a head's target patch gets relative weight 1, its 4-neighbours e^-1 (0.37), its
# diagonal neighbours e^-2 (0.14), patches two steps away e^-4 (0.02): local, but not one-hot, so the content
# term and the gradient still reach the neighbourhood.
DEFAULT_INIT_SHARPNESS = 1.0


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))  # log(e^y - 1), stable for large y


def relative_positions(grid_size: tuple[int, int]) -> torch.Tensor:
    """(P, P, 2) float: key position - query position, (dy, dx), for the P = H*W patches in row-major order."""
    h, w = grid_size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1).float()
    return pos[None, :, :] - pos[:, None, :]


class MHCAttention(nn.Module):
    """Drop-in for timm's `Attention` in a ViT `Block`, for `num_prefix_tokens` tokens then a `grid_size` grid."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            grid_size: tuple[int, int] = (14, 14),
            num_prefix_tokens: int = 2,
            qkv_bias: bool = True,
            attn_drop: float = 0.1,
            proj_drop: float = 0.,
            init_sharpness: float = DEFAULT_INIT_SHARPNESS,
            use_content: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if init_sharpness <= 0:
            raise ValueError(f"init_sharpness must be > 0, got {init_sharpness}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        self.use_content = use_content  # False: positional attention only (the convolution-tap test)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)  # a module like timm's, but only its `p` is used (by SDPA)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        # Sharpness through softplus keeps it > 0; offsets cycle through the 3x3 window when heads > 9.
        self.alpha = nn.Parameter(torch.full((num_heads,), inverse_softplus(init_sharpness)))
        offsets = [WINDOW_3X3[h % len(WINDOW_3X3)] for h in range(num_heads)]
        self.offsets = nn.Parameter(torch.tensor(offsets, dtype=torch.float32))
        # Not persistent: a function of grid_size, rebuilt on load.
        self.register_buffer("rel_pos", relative_positions(self.grid_size), persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def sharpness(self) -> torch.Tensor:
        return F.softplus(self.alpha)

    def positional_bias(self) -> torch.Tensor:
        """(heads, T, T) additive logits; zero in every row and column of a prefix token."""
        diff = self.rel_pos[None] - self.offsets[:, None, None, :]  # (heads, P, P, 2)
        patch_bias = -self.sharpness()[:, None, None] * diff.pow(2).sum(-1)
        n = self.num_prefix_tokens
        return F.pad(patch_bias, (n, 0, n, 0))

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        if N != self.num_tokens:
            raise ValueError(f"MHCA built for {self.num_prefix_tokens} prefix tokens + a {self.grid_size} grid "
                             f"({self.num_tokens} tokens), got {N}")
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.use_content:
            q = torch.zeros_like(q)  # q·k = 0: the logits are the positional bias alone
        bias = self.positional_bias().to(q.dtype)
        # A caller's mask (bool or float) or causal flag adds on top, as in timm's non-fused path.
        bias = maybe_add_mask(bias, resolve_self_attn_mask(N, bias, attn_mask, is_causal))
        x = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=bias,  # (heads, T, T) broadcasts over the batch
            dropout_p=self.attn_drop.p if self.training else 0.,
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, grid={self.grid_size}, prefix={self.num_prefix_tokens}, "
                f"use_content={self.use_content}")
