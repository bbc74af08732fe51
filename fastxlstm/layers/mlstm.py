"""The xLSTM-Large mLSTM layer: projections, soft-capped gates, the cell op, per-head norm, output gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import Backend, MLSTMState
from .common import MultiHeadLayerNorm, soft_cap


class MLSTMLayer(nn.Module):
    """x (B, T, E) -> y (B, T, E) with state. Parameter names are those of the published xLSTM-7B.

    q, k, v, the output gate and the i/f gates all read the same (pre-normed) input; the gates are
    one scalar per head, soft-capped; the output gate multiplies after the per-head norm.
    """

    def __init__(self, embedding_dim: int, num_heads: int, qk_dim: int, v_dim: int, *,
                 gate_soft_cap: float = 15.0, norm_eps: float = 1e-6, cell_eps: float = 1e-6,
                 use_bias: bool = False, norm_reduction_force_float32: bool = True, chunk_size: int = 64):
        super().__init__()
        self.num_heads = num_heads
        self.qk_head_dim, self.v_head_dim = qk_dim // num_heads, v_dim // num_heads
        self.gate_soft_cap, self.cell_eps, self.chunk_size = gate_soft_cap, cell_eps, chunk_size
        self.q = nn.Linear(embedding_dim, qk_dim, bias=use_bias)
        self.k = nn.Linear(embedding_dim, qk_dim, bias=use_bias)
        self.v = nn.Linear(embedding_dim, v_dim, bias=use_bias)
        self.ogate_preact = nn.Linear(embedding_dim, v_dim, bias=use_bias)
        self.igate_preact = nn.Linear(embedding_dim, num_heads, bias=True)
        self.fgate_preact = nn.Linear(embedding_dim, num_heads, bias=True)
        self.multihead_norm = MultiHeadLayerNorm(num_heads, self.v_head_dim, eps=norm_eps, use_bias=use_bias,
                                                 force_float32=norm_reduction_force_float32)
        self.out_proj = nn.Linear(v_dim, embedding_dim, bias=use_bias)

    # Training: the output gate and the i/f gates through one GEMM over their concatenated weights.
    # The gates alone are (E x H) GEMMs, three each per step (forward, dL/dx, dL/dW) that cost as much
    # as reading x: 144 launches and 5.5 ms of a 1.3b step at 4 x 4096 (run 34). Not q, k, v: their
    # gradients come from the cell's kernels, and gathering them for one GEMM copies more than it
    # saves (measured, run 30). Not without gradients: the concatenation copies the weights per call.
    fuse_gate_projections: bool = True

    def forward(self, x: torch.Tensor, state: MLSTMState | None = None, *, backend: Backend = Backend.NATIVE,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, MLSTMState]:
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q(x).view(B, T, H, self.qk_head_dim)
        k = self.k(x).view(B, T, H, self.qk_head_dim)
        v = self.v(x).view(B, T, H, self.v_head_dim)
        if self.fuse_gate_projections and torch.is_grad_enabled() and T > 1:
            o, i, f = self._gate_projections(x)
        else:
            o, i, f = self.ogate_preact(x), self.igate_preact(x), self.fgate_preact(x)
        i = soft_cap(i, self.gate_soft_cap)                         # (B, T, H)
        f = soft_cap(f, self.gate_soft_cap)                         # (B, T, H)
        if T == 1 and state is not None and cu_seqlens is None:
            h, state = ops.mlstm_step(q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], state,
                                      backend=backend, eps=self.cell_eps)
            h = h.unsqueeze(1)
        else:
            h, state = ops.mlstm(q, k, v, i, f, state, backend=backend, chunk_size=self.chunk_size,
                                 eps=self.cell_eps, cu_seqlens=cu_seqlens)
        return self.out_proj(self.multihead_norm.gated(h, o)), state   # gated: (B, T, H*Dv)

    def _gate_projections(self, x: torch.Tensor) -> list[torch.Tensor]:
        """o, i, f of x through one GEMM (the same function: +0 for a missing bias is exact)."""
        lins = (self.ogate_preact, self.igate_preact, self.fgate_preact)
        w = torch.cat([lin.weight for lin in lins])
        b = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in lins])
        return F.linear(x, w, b).split([lin.out_features for lin in lins], dim=-1)
