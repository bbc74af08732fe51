"""The original (NeurIPS 2024) mLSTM layer: up-projection into a cell branch and a gate branch,
causal conv + swish, block-diagonal q/k/v, the mLSTM cell op, per-head norm, learnable skip,
swish output gate and down-projection. Built on ``ops.mlstm``, so any length runs (the official
layer is capped at its context_length)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import Backend
from .common import CausalConv1d, LayerState, MultiHeadLayerNorm, small_init_, wang_init_


class BlockDiagonalLinear(nn.Module):
    """y[..., j, :] = W[j] x[..., j, :] (+ b) over blocks of ``block_size`` features."""

    def __init__(self, dim: int, block_size: int, *, use_bias: bool = False):
        super().__init__()
        if dim % block_size:
            raise ValueError(f"dim {dim} must be divisible by block_size {block_size}")
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))  # [block, out, in]
        self.bias = nn.Parameter(torch.zeros(dim)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("...jd,jod->...jo", x.unflatten(-1, (-1, self.block_size)), self.weight.to(x.dtype))
        y = y.flatten(-2)
        return y + self.bias if self.bias is not None else y


class OriginalMLSTMLayer(nn.Module):
    """x (B, T, E) -> y (B, T, E) with a LayerState(conv, MLSTMState).

    x_m, z = proj_up(x); x_c = swish(conv(x_m)); q, k = Wq x_c, Wk x_c; v = Wv x_m;
    i, f = Linear([q, k, v]) per head (no soft cap); h = norm(mLSTM(q, k, v, i, f));
    y = proj_down((h + skip * x_c) * swish(z)).
    The official cell scales k by 1/sqrt(D) and stabilises with the plain row max; ops.mlstm
    scales q (same h) and includes m_0 = 0 in the max. Both are the same function up to
    eps * exp(m) in the denominator, and ours is larger only where m = sum of log f <= 0, so the
    difference is below eps = 1e-6 relative: no correction is needed.
    """

    def __init__(self, embedding_dim: int, inner_dim: int, num_heads: int, *, qkv_block_size: int = 4,
                 conv_kernel_size: int = 4, use_bias: bool = False, norm_eps: float = 1e-5,
                 cell_eps: float = 1e-6, chunk_size: int = 64):
        super().__init__()
        if inner_dim % num_heads:
            raise ValueError(f"inner_dim {inner_dim} must be divisible by num_heads {num_heads}")
        self.inner_dim, self.num_heads, self.head_dim = inner_dim, num_heads, inner_dim // num_heads
        self.cell_eps, self.chunk_size = cell_eps, chunk_size
        self.proj_up = nn.Linear(embedding_dim, 2 * inner_dim, bias=use_bias)
        self.conv = CausalConv1d(inner_dim, conv_kernel_size)
        self.q_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, use_bias=use_bias)
        self.k_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, use_bias=use_bias)
        self.v_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, use_bias=use_bias)
        self.igate = nn.Linear(3 * inner_dim, num_heads)
        self.fgate = nn.Linear(3 * inner_dim, num_heads)
        self.outnorm = MultiHeadLayerNorm(num_heads, self.head_dim, eps=norm_eps)
        self.learnable_skip = nn.Parameter(torch.ones(inner_dim))
        self.proj_down = nn.Linear(inner_dim, embedding_dim, bias=use_bias)

    def reset_parameters(self, num_blocks: int = 1) -> None:
        """Official NeurIPS mLSTM init (small_init with dim = E, wang for proj_down, gate biases)."""
        E = self.proj_up.in_features
        for lin in (self.proj_up, self.q_proj, self.k_proj, self.v_proj):
            small_init_(lin.weight, E)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        wang_init_(self.proj_down.weight, E, num_blocks)
        if self.proj_down.bias is not None:
            nn.init.zeros_(self.proj_down.bias)
        self.conv.reset_parameters()
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.ones_(self.outnorm.weight)
        nn.init.ones_(self.learnable_skip)

    def forward(self, x: torch.Tensor, state: LayerState | None = None, *,
                backend: Backend = Backend.NATIVE) -> tuple[torch.Tensor, LayerState]:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        conv_state, cell_state = state if state is not None else (None, None)
        x_m, z = self.proj_up(x).split(self.inner_dim, dim=-1)
        x_c, conv_state = self.conv(x_m, conv_state)
        x_c = F.silu(x_c)
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)      # (B, T, inner) each
        qkv = torch.cat([q, k, v], dim=-1)
        i, f = self.igate(qkv), self.fgate(qkv)                               # (B, T, H)
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))
        if T == 1 and cell_state is not None:
            h, cell_state = ops.mlstm_step(q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], cell_state,
                                           backend=backend, eps=self.cell_eps)
            h = h.unsqueeze(1)
        else:
            h, cell_state = ops.mlstm(q, k, v, i, f, cell_state, backend=backend,
                                      chunk_size=self.chunk_size, eps=self.cell_eps)
        h = self.outnorm(h) + self.learnable_skip * x_c
        return self.proj_down(h * F.silu(z)), LayerState(conv_state, cell_state)
