"""Triton sLSTM: autograd wiring and launches for the fused forward and backward kernels.

The recurrent matmul runs in x's dtype (bf16 under autocast: tensor cores; float32 with IEEE
products, so float32 results match the reference to rounding); states, gates and all gradients
of the recurrence are float32. float64 is not supported here (use the native backend).
"""

from __future__ import annotations

import torch
import triton

from ...state import SLSTMState
from .. import initial_state
from ..reference import slstm_step as _reference_step
from .bwd import slstm_bwd_kernel
from .fwd import slstm_fwd_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def slstm(x, r, state: SLSTMState | None = None, *, forget_gate: str = "sigmoid", block_b: int = 16,
          block_n: int | None = None, block_k: int | None = None, num_warps: int = 4,
          num_stages: int | None = None) -> tuple[torch.Tensor, SLSTMState]:
    """Same contract as ``reference.slstm``. Launch knobs: block_b batch rows per program (>= 16,
    tl.dot's minimum), block_n output columns and block_k reduction slice per dot (powers of two
    >= 16; None picks min(D, 64) and min(D, 128), 64 for float32), num_warps per program and
    num_stages of Triton's software pipelining (None: Triton's default)."""
    named = [("x", x), ("r", r)] + [(f"state.{k}", v) for k, v in (state._asdict().items() if state else ())]
    for name, t in named:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"triton sLSTM supports {SUPPORTED_DTYPES}; {name} is {t.dtype}")
    for name, v in (("block_b", block_b), ("block_n", block_n), ("block_k", block_k)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")
    s0 = initial_state(x, r, state)
    D = x.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    # R tiles of 4 gates x BLOCK_K x BLOCK_N, software-pipelined, must fit in shared memory (227 KiB):
    # 128 x 64 in 2-byte types, 64 x 64 in float32 (measured on the H200: both fit, wider does not)
    default_k = 128 if x.element_size() <= 2 else 64
    meta = dict(BLOCK_B=block_b, BLOCK_N=block_n or min(block_d, 64), BLOCK_K=block_k or min(block_d, default_k),
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps)
    if num_stages is not None:
        meta["num_stages"] = num_stages
    h, c, n, m, hT = _SLSTMTriton.apply(x, r, *s0, forget_gate == "exp", meta)
    return h, SLSTMState(c, n, m, hT)


def slstm_step(x, r, state: SLSTMState | None = None, *,
               forget_gate: str = "sigmoid") -> tuple[torch.Tensor, SLSTMState]:
    """One decode step: a (B, H, D) update is launch-bound either way; the reference formula serves."""
    return _reference_step(x, r, state, forget_gate=forget_gate)


class _SLSTMTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, c0, n0, m0, h0, forget_exp: bool, meta: dict):
        B, T, H, _, D = x.shape
        x = x.contiguous()
        rd = r.to(x.dtype).contiguous()
        c0, n0, m0, h0 = (t.contiguous() for t in (c0, n0, m0, h0))
        save = any(ctx.needs_input_grad[:6])
        f32 = dict(device=x.device, dtype=torch.float32)
        y = torch.empty(B, T, H, D, device=x.device, dtype=x.dtype)
        c, n, m = (torch.empty(B, H, D, **f32) for _ in range(3))
        hbuf = torch.empty(2, B, H, D, **f32)                   # h_{t-1} / h_t ping-pong
        if save:
            pre = torch.empty(B, T, H, 4, D, **f32)
            hist = [torch.empty(B, T + 1, H, D, **f32) for _ in range(4)]
        else:
            pre, hist = y, [y] * 4                                  # never written when SAVE is off
        grid = (triton.cdiv(B, meta["BLOCK_B"]), H)
        slstm_fwd_kernel[grid](x, rd, c0, n0, m0, h0, y, pre, *hist, c, n, m, hbuf, B, T, H, D,
                               FORGET_EXP=forget_exp, SAVE=save, **meta)
        if save:
            ctx.save_for_backward(rd, pre, *hist)
        ctx.meta, ctx.grid, ctx.forget_exp = meta, grid, forget_exp
        ctx.x_dtype, ctx.r_dtype = x.dtype, r.dtype
        return y, c, n, m, hbuf[T % 2].clone()

    @staticmethod
    def backward(ctx, dy, dcT, dnT, dmT, dhT):
        rd, pre, cs, ns, ms, hs = ctx.saved_tensors
        B, T, H, _, D = pre.shape
        zeros = lambda: torch.zeros(B, H, D, device=pre.device, dtype=torch.float32)  # noqa: E731
        dfinal = [g.float().contiguous() if g is not None else zeros() for g in (dcT, dnT, dmT, dhT)]
        dy = dy.contiguous() if dy is not None else torch.zeros(B, T, H, D, device=pre.device)
        dpre = torch.empty_like(pre)
        dinit = [torch.empty(B, H, D, device=pre.device, dtype=torch.float32) for _ in range(4)]
        slstm_bwd_kernel[ctx.grid](rd, pre, cs, ns, ms, dy, *dfinal, dpre, *dinit, B, T, H, D,
                                   FORGET_EXP=ctx.forget_exp, **ctx.meta)
        # dR[h] = sum over (b, t) of h_{t-1}^T dpre_t: one batched matmul per head
        dr = torch.einsum("bthd,bthge->hdge", hs[:, :T], dpre)
        return (dpre.to(ctx.x_dtype), dr.to(ctx.r_dtype), *dinit, None, None)
