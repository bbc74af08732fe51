"""The original sLSTM layer: causal conv + swish feeding the i and f gates, headwise gate
projections, per-head recurrent weights, the sLSTM cell op and a per-head group norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import Backend
from .common import CausalConv1d, LayerState, MultiHeadLayerNorm, small_init_


class SLSTMLayer(nn.Module):
    """x (B, T, E) -> y (B, T, E) with a LayerState(conv, SLSTMState).

    Gate pre-activations: i, f = W_{i,f} swish(conv(x)), z, o = W_{z,o} x, each W block-diagonal
    over heads (H, D, D); plus the bias (H, 4, D) and, inside the op, R h_{t-1}. Names say which
    gate a weight feeds (the official module names igate/fgate are swapped against the cell).
    """

    def __init__(self, embedding_dim: int, num_heads: int, *, conv_kernel_size: int = 4,
                 forget_gate: str = "sigmoid", norm_eps: float = 1e-5):
        super().__init__()
        if embedding_dim % num_heads:
            raise ValueError(f"embedding_dim {embedding_dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, embedding_dim // num_heads
        self.forget_gate = forget_gate
        H, D = num_heads, self.head_dim
        self.conv = CausalConv1d(embedding_dim, conv_kernel_size) if conv_kernel_size > 0 else None
        self.gate_weight = nn.Parameter(torch.empty(H, 4, D, D))       # [head, gate i f z o, out, in]
        self.bias = nn.Parameter(torch.empty(H, 4, D))
        self.recurrent_weight = nn.Parameter(torch.empty(H, D, 4, D))  # the ops layout: [head, in, gate, out]
        self.group_norm = MultiHeadLayerNorm(H, D, eps=norm_eps)

    def reset_parameters(self, block_idx: int = 0, num_blocks: int = 1) -> None:
        """Official sLSTM init: gate projections small_init(E), R = 0, biases 0 except the forget
        gate's power law, which runs from +5 down to -7 within each head, steeper in later blocks."""
        E = self.num_heads * self.head_dim
        small_init_(self.gate_weight, E)
        nn.init.zeros_(self.recurrent_weight)
        with torch.no_grad():
            self.bias.zero_()
            ratio = block_idx / (num_blocks - 1) if num_blocks > 1 else 0.0
            j = torch.arange(self.head_dim, dtype=torch.float64) / max(self.head_dim - 1, 1)
            self.bias[:, 1] = (5.0 - 12.0 * j ** (0.3 + 1.3 * ratio)).to(self.bias.dtype)
        if self.conv is not None:
            self.conv.reset_parameters()
        nn.init.ones_(self.group_norm.weight)

    def forward(self, x: torch.Tensor, state: LayerState | None = None, *,
                backend: Backend = Backend.NATIVE) -> tuple[torch.Tensor, LayerState]:
        B, T, E = x.shape
        H, D = self.num_heads, self.head_dim
        conv_state, cell_state = state if state is not None else (None, None)
        if self.conv is not None:
            xc, conv_state = self.conv(x, conv_state)
            xc = F.silu(xc)
        else:
            xc = x
        w = self.gate_weight.to(x.dtype)
        pre_if = torch.einsum("bthd,hged->bthge", xc.view(B, T, H, D), w[:, :2])
        pre_zo = torch.einsum("bthd,hged->bthge", x.view(B, T, H, D), w[:, 2:])
        pre = torch.cat([pre_if, pre_zo], dim=3)                           # (B, T, H, 4, D)
        pre = pre + self.bias.to(pre.dtype)     # keep autocast's dtype (a float32 bias would promote)
        if T == 1 and cell_state is not None:
            h, cell_state = ops.slstm_step(pre[:, 0], self.recurrent_weight, cell_state, backend=backend,
                                           forget_gate=self.forget_gate)
            h = h.unsqueeze(1)
        else:
            h, cell_state = ops.slstm(pre, self.recurrent_weight, cell_state, backend=backend,
                                      forget_gate=self.forget_gate)
        return self.group_norm(h), LayerState(conv_state, cell_state)
