"""Small shared layers: soft cap, RMSNorm, per-head LayerNorm, SwiGLU FFN, init helpers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): smooth, odd, identity near 0 and bounded by +-cap. None disables it."""
    if cap is None or cap <= 0:
        return x
    return cap * torch.tanh(x / cap)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight (+ bias), the reduction in float32 when asked."""

    def __init__(self, dim: int, eps: float = 1e-6, *, use_bias: bool = False, force_float32: bool = True):
        super().__init__()
        self.eps = eps
        self.force_float32 = force_float32
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.force_float32:
            x = x.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        x = x * self.weight
        return x + self.bias if self.bias is not None else x


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's Dv features of (B, T, H, Dv), then a flat (H*Dv) weight.

    The weight is stored flat, as in the published checkpoints.
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, *, use_bias: bool = False,
                 force_float32: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.eps = eps
        self.force_float32 = force_float32
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H, Dv) -> (B, T, H*Dv)."""
        dtype = x.dtype
        if self.force_float32:
            x = x.float()
        x = x - x.mean(-1, keepdim=True)
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        x = x.flatten(-2) * self.weight
        return x + self.bias if self.bias is not None else x


class SwiGLU(nn.Module):
    """y = W_down(silu(W_gate x) * W_up x); key names as the published xLSTM-7B."""

    def __init__(self, dim: int, hidden: int, *, use_bias: bool = False):
        super().__init__()
        self.proj_up_gate = nn.Linear(dim, hidden, bias=use_bias)
        self.proj_up = nn.Linear(dim, hidden, bias=use_bias)
        self.proj_down = nn.Linear(hidden, dim, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_down(F.silu(self.proj_up_gate(x)) * self.proj_up(x))


def round_up(x: float, multiple: int) -> int:
    """ceil(x / multiple) * multiple, for projection widths."""
    return int(math.ceil(x / multiple) * multiple)


def small_init_(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Normal with std sqrt(2 / (5 dim)) (Nguyen & Salazar 2019), used by the xLSTM papers."""
    return nn.init.normal_(weight, mean=0.0, std=math.sqrt(2 / (5 * dim)))


def wang_init_(weight: torch.Tensor, dim: int, num_blocks: int) -> torch.Tensor:
    """Normal with std 2 / (num_blocks sqrt(dim)) (Wang 2021, GPT-J) for residual output projections."""
    return nn.init.normal_(weight, mean=0.0, std=2 / (num_blocks * math.sqrt(dim)))
