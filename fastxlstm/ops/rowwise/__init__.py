"""Fused row-wise work on CUDA: residual add + RMSNorm, the per-head LayerNorm times the output
gate, SwiGLU's silu(gate) * up (inference forwards), SwiGLU over a joint gate|up projection with
its gradient (``swiglu``, training), and the soft-capped cross-entropy of logit rows with its
gradient (the chunked LM-head loss, fastxlstm/loss.py).

Why: eagerly each of these is five to eight elementwise kernels over (B, T, E)-sized tensors (the
float32 reductions cast up and back); in a 7B prefill they took ~30 % of the GPU time, as much
as a third of the GEMMs (benchmarks/RESULTS.md, fifth session). Here each is one pass. Only for
calls that need no gradient (prefill, scoring, evaluation); training keeps the eager formulas,
which torch.compile fuses there, except ``swiglu``: there the point is the layout of the gradient
(one tensor for both halves, so the joint projection's backward is one GEMM each for dL/dx and
the weight). The joint projection with torch's ops for the halves measured slower than two
projections in a compiled 1.3b step (run 39); with this op, faster (runs 44, 46). The kernels
round where the eager formulas of layers/common.py round (to the input dtype after the float32
normalisation, after the weight, after the gate), so the results agree to the reductions'
summation order.
"""

from __future__ import annotations

import torch

from .. import triton_available

__all__ = ["usable", "add_rms_norm", "gated_head_norm", "silu_mul", "swiglu", "cross_entropy_rows"]


def usable(x: torch.Tensor, *weights) -> bool:
    """Whether the fused kernels serve this call: a CUDA tensor, no gradient wanted, not being
    traced by torch.compile, Triton installed, and weights of x's dtype (under autocast the eager
    formulas' type promotion decides the output dtype). The functions below also run on CPU
    tensors under TRITON_INTERPRET=1 (the tests), but the layers never send CPU work there."""
    if not x.is_cuda or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or not triton_available():
        return False
    return all(w is None or w.dtype == x.dtype for w in weights)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s) * weight (+ bias)) with s = x + y (s = x when y is None); the reduction in
    float32, as RMSNorm with force_float32."""
    from . import triton as kernels                    # Triton only where it is used
    return kernels.add_rms_norm(x, y, weight, bias, eps)


def gated_head_norm(h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """sigmoid(o) * (LayerNorm of each head of h (B, T, H, Dv) over Dv, flattened, times weight
    (+ bias)): (B, T, H * Dv)."""
    from . import triton as kernels
    return kernels.gated_head_norm(h, o, weight, bias, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, each rounded to the input dtype as F.silu(gate) * up rounds."""
    from . import triton as kernels
    return kernels.silu_mul(gate, up)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(g) * u of y = [g | u] (..., 2F) -> (..., F), differentiable: the backward writes the
    gradient of both halves into one (..., 2F) tensor, so that a joint gate|up projection needs
    one GEMM for dL/dx and one for its weight, and no gather of the halves' gradients. Rounds as
    eager autograd of ``F.silu(g) * u`` does. CUDA (or TRITON_INTERPRET=1)."""
    if y.shape[-1] % 2 or y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"y must be (..., 2F) float32/bfloat16/float16, got {tuple(y.shape)} {y.dtype}")
    return torch.ops.fastxlstm.swiglu(y.contiguous())


@torch.library.custom_op("fastxlstm::swiglu", mutates_args=())
def _swiglu(y: torch.Tensor) -> torch.Tensor:
    from . import triton as kernels
    F = y.shape[-1] // 2
    return kernels.silu_mul(y[..., :F], y[..., F:])


@_swiglu.register_fake
def _(y):
    return y.new_empty(*y.shape[:-1], y.shape[-1] // 2)


@torch.library.custom_op("fastxlstm::swiglu_bwd", mutates_args=())
def _swiglu_bwd(da: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from . import triton as kernels
    return kernels.silu_mul_backward(da, y)


@_swiglu_bwd.register_fake
def _(da, y):
    return torch.empty_like(y)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, da):
    (y,) = ctx.saved_tensors
    return torch.ops.fastxlstm.swiglu_bwd(da.to(y.dtype), y)


torch.library.register_autograd("fastxlstm::swiglu", _swiglu_grad, setup_context=_swiglu_setup)


def cross_entropy_rows(z: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor, cap: float | None,
                       grad: bool) -> torch.Tensor:
    """Per-row loss (n,) float32 of logits z (n, V): (logsumexp(s) - s[target]) * row_weight with
    s = cap * tanh(z / cap) (z when cap is None or 0), computed in float32. With ``grad``, z is
    overwritten in place by the loss's gradient, row_weight * (softmax(s) - onehot(target)) *
    (1 - tanh(z / cap)^2), rounded to z's dtype. One pass over z (two with grad; the second mostly
    from L2), where the eager formulas take about ten. targets: (n,) int64 in [0, V) (a row whose target
    is not gets a NaN loss); row_weight: (n,) float32 (0 for rows that do not count)."""
    if z.dim() != 2 or z.stride(1) != 1 or z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"z must be (n, V) float32/bfloat16/float16 with unit column stride, got "
                         f"{tuple(z.shape)} {z.dtype} strides {z.stride()}")
    if targets.shape != z.shape[:1] or row_weight.shape != z.shape[:1] or row_weight.dtype != torch.float32:
        raise ValueError(f"targets and float32 row_weight must be ({z.shape[0]},), got {tuple(targets.shape)} "
                         f"and {tuple(row_weight.shape)} {row_weight.dtype}")
    from . import triton as kernels
    return kernels.cross_entropy_rows(z, targets.contiguous(), row_weight.contiguous(), cap or 0.0, grad)
