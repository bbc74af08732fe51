"""Small shared layers: soft cap, RMSNorm, per-head LayerNorm, SwiGLU FFN, init helpers."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import rowwise, triton_available


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): smooth, odd, identity near 0 and bounded by +-cap. None or 0 disables it.

    On logits this is three passes over a (B, T, vocab) tensor, as costly as the LM head on a CPU:
    compute it in place on one fresh buffer, and keep only tanh for the backward.
    """
    if cap is None or cap <= 0:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _SoftCap.apply(x, float(cap))
    return (x / cap).tanh_().mul_(cap)


class _SoftCap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cap):
        t = (x / cap).tanh_()
        ctx.save_for_backward(t)
        return t * cap

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        out = t * t                                   # grad * (1 - t^2) in two passes, one buffer
        return torch.addcmul(grad, grad, out, value=-1, out=out), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
             force_float32: bool) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight (+ bias); a plain function so fused code paths (the
    decode step) compute exactly what RMSNorm does."""
    dtype = x.dtype
    if force_float32:
        x = x.float()
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * weight
    return x if bias is None else x + bias


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float, force_float32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + y (x when y is None): one pass where the fused row kernels
    serve the call (they reduce in float32), the eager formulas otherwise."""
    if y is not None and y.dtype != x.dtype:
        x, y = x + y, None                                 # type promotion decides the sum's dtype
    if force_float32 and rowwise.usable(x, weight, bias):
        return rowwise.add_rms_norm(x, y, weight, bias, eps)
    if y is not None:
        x = x + y
    return x, rms_norm(x, weight, bias, eps, force_float32)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: one pass where the fused row kernels serve the call."""
    if rowwise.usable(gate) and up.dtype == gate.dtype:
        return rowwise.silu_mul(gate, up)
    return F.silu(gate) * up


def head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                    force_float32: bool) -> torch.Tensor:
    """LayerNorm over the last dim of (..., H, Dv), flattened to (..., H*Dv), times a flat weight."""
    dtype = x.dtype
    if force_float32:
        x = x.float()
    x = x - x.mean(-1, keepdim=True)
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    x = x.flatten(-2) * weight
    return x if bias is None else x + bias


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight (+ bias), the reduction in float32 when asked."""

    def __init__(self, dim: int, eps: float = 1e-6, *, use_bias: bool = False, force_float32: bool = True):
        super().__init__()
        self.eps = eps
        self.force_float32 = force_float32
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_rms_norm(x, None, self.weight, self.bias, self.eps, self.force_float32)[1]

    def add_forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, this norm of it): one pass where the fused row kernels serve the call."""
        return add_rms_norm(x, y, self.weight, self.bias, self.eps, self.force_float32)


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
        return head_layer_norm(x, self.weight, self.bias, self.eps, self.force_float32)

    def gated(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """sigmoid(o) * this norm of x: one pass where the fused row kernels serve the call."""
        if self.force_float32 and rowwise.usable(x, self.weight, self.bias) and o.dtype == x.dtype:
            return rowwise.gated_head_norm(x, o, self.weight, self.bias, self.eps)
        return torch.sigmoid(o) * self(x)


# probed at import: compiled blocks must not trace the probe's import machinery (a graph break)
_HAS_TRITON = triton_available()


def _joint_gate_up(x: torch.Tensor) -> bool:
    """Whether SwiGLU runs gate|up as one GEMM with rowwise.swiglu: CUDA training (no-grad calls
    keep the two projections and the fused inference row kernel)."""
    return _HAS_TRITON and x.is_cuda and torch.is_grad_enabled()


class SwiGLU(nn.Module):
    """y = W_down(silu(W_gate x) * W_up x); key names as the published xLSTM-7B."""

    def __init__(self, dim: int, hidden: int, *, use_bias: bool = False):
        super().__init__()
        self.proj_up_gate = nn.Linear(dim, hidden, bias=use_bias)
        self.proj_up = nn.Linear(dim, hidden, bias=use_bias)
        self.proj_down = nn.Linear(hidden, dim, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _joint_gate_up(x):
            # training: gate and up as one GEMM of 2F columns, and its backward as one GEMM each for
            # dL/dx and the weight, over the joint gradient rowwise.swiglu writes (2F = 11008 runs at
            # ~787 TFLOP/s where F = 5504 runs at ~690 on the H200 (run 43))
            w = torch.cat([self.proj_up_gate.weight, self.proj_up.weight])
            b = None if self.proj_up.bias is None else torch.cat([self.proj_up_gate.bias, self.proj_up.bias])
            return self.proj_down(rowwise.swiglu(F.linear(x, w, b)))
        return self.proj_down(silu_mul(self.proj_up_gate(x), self.proj_up(x)))


def round_up(x: float, multiple: int) -> int:
    """ceil(x / multiple) * multiple, for projection widths."""
    return int(math.ceil(x / multiple) * multiple)


def small_init_(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Normal with std sqrt(2 / (5 dim)) (Nguyen & Salazar 2019), used by the xLSTM papers."""
    return nn.init.normal_(weight, mean=0.0, std=math.sqrt(2 / (5 * dim)))


def wang_init_(weight: torch.Tensor, dim: int, num_blocks: int) -> torch.Tensor:
    """Normal with std 2 / (num_blocks sqrt(dim)) (Wang 2021, GPT-J) for residual output projections."""
    return nn.init.normal_(weight, mean=0.0, std=2 / (num_blocks * math.sqrt(dim)))


class LayerState(NamedTuple):
    """State of a layer with a causal conv in front of its cell: the conv's last K-1 inputs
    (B, K-1, C), or None without a conv, and the cell state (MLSTMState or SLSTMState)."""

    conv: torch.Tensor | None
    cell: tuple


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time: y_t = bias + sum_k weight[:, k] * x_{t-K+1+k}.

    One code path for every length: the conv state (the last K-1 inputs, zeros at the start) is
    prepended, so a full forward equals any split of it, down to single steps.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PyTorch's Conv1d default for a depthwise conv: fan_in = kernel_size
        bound = 1 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, C); state: (B, K-1, C) or None for zeros. Returns y (B, T, C) and the new state."""
        B, T, C = x.shape
        K = self.kernel_size
        if state is None:
            state = x.new_zeros(B, K - 1, C)
        elif tuple(state.shape) != (B, K - 1, C):
            raise ValueError(f"conv state must be (B, K-1, C) = {(B, K - 1, C)}, got {tuple(state.shape)}")
        xp = torch.cat([state.to(x.dtype), x], dim=1)                      # (B, K-1+T, C)
        y = F.conv1d(xp.transpose(1, 2), self.weight.unsqueeze(1).to(x.dtype), self.bias.to(x.dtype), groups=C)
        return y.transpose(1, 2), xp[:, xp.shape[1] - (K - 1):]


class GatedFFN(nn.Module):
    """y = W_down(act(gate) * up) with [gate | up] = W_up x: the original xLSTM stack's FFN."""

    ACTIVATIONS = {"gelu": F.gelu, "swish": F.silu, "relu": F.relu}

    def __init__(self, dim: int, hidden: int, *, act: str = "gelu", use_bias: bool = False):
        super().__init__()
        if act not in self.ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(self.ACTIVATIONS)}, got {act!r}")
        self.hidden, self.act = hidden, self.ACTIVATIONS[act]
        self.proj_up = nn.Linear(dim, 2 * hidden, bias=use_bias)
        self.proj_down = nn.Linear(hidden, dim, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.proj_up(x).split(self.hidden, dim=-1)
        return self.proj_down(self.act(gate) * up)
