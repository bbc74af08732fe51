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
          block_n: int | None = None, block_k: int | None = None, num_warps: int = 8,
          num_stages: int | None = 2, full_k: bool = False) -> tuple[torch.Tensor, SLSTMState]:
    """Same contract as ``reference.slstm``. Launch knobs: block_b batch rows per program (>= 16,
    tl.dot's minimum); block_n output columns and block_k reduction slice per dot (powers of two
    >= 16; None: min(D, 64)); num_warps per program; num_stages of Triton's software pipelining
    (None: Triton's default); full_k reduces over all of D in one slice (block_k >= D), so the
    column loop is innermost.

    Defaults: off-device compiles for sm_90 (triton 3.9, cuobjdump) show 64 x 64 tiles with 8 warps
    and 2 stages free of register spills in both kernels and every dtype; the 64 x 128 x 4-warp
    launch measured on the H200 (run 2 in benchmarks/RESULTS.md) spilled 568 bytes per thread.
    """
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
    meta = dict(BLOCK_B=block_b, BLOCK_N=block_n or min(block_d, 64), BLOCK_K=block_k or min(block_d, 64),
                FULL_K=full_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps)
    if num_stages is not None:
        meta["num_stages"] = num_stages
    if full_k and meta["BLOCK_K"] < D:
        raise ValueError(f"full_k needs block_k >= D = {D}, got block_k {meta['BLOCK_K']}")
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
