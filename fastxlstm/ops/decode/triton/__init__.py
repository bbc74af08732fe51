"""Triton kernels for small-batch decoding: the mLSTM step with the layer's head norm and output gate.

At small batch a decode step reads every weight and the whole recurrent state once and does little
else, so its speed is the memory stream's, and what costs is each launch's gap, ramp and tail.
generation/fused.py's hybrid step runs a block of XLSTMLarge as one GEMM per projection
(``skinny_linear`` of skinny.py up to 16 rows, with the norms and silu x up in its epilogues;
cuBLAS above, with row kernels between) and this module's step kernel:

    mlstm_head_step   gate soft caps -> the mLSTM step -> per-head LayerNorm -> x sigmoid(o)

One program owns BK rows of one head's C (all of Dv): it updates them and n, and forms its share of
q~ C' and q~ . n'; the last program of the head (a per-head counter) adds the shares in program
order and writes the normalised, gated output row: deterministic, one launch, and the counter is
left at zero. With ``inplace`` the state is updated where it lies (the engine's decoders own theirs),
so a CUDA graph of decode steps needs no state copy at its end.

Programmatic dependent launch (PDL, sm_90+): the kernel may start while the previous launch drains;
it reads only its inputs after ``gdc_wait`` unless ``early_state`` says the previous launch cannot
have written the state. The epilogue rounds where the model's eager ops round, so the kernel
computes the model's function to its dtype's rounding. No autograd: decoding only.

Measured (H200, 7B shape, batch 16, 32 blocks' states in one CUDA graph): 39.0-39.6 us a block
against 33.7-33.8 us for a plain copy of the same state bytes (runs 45, 49); in the hybrid step
with the state in place 35.2 us (run 52). Tiles of 8 or 32 rows, 2 warps, or the state stored after
the counter instead of before were no faster (runs 49, 52, 54). The batch-1 GEMV kernels that ran
a block in five launches (sessions 3-8) were removed when the hybrid step on skinny_linear beat
them: 246.7 against 220.5 tokens/s at batch 1, one process (run 53).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ...mlstm.triton.fwd import _logsigmoid
from ...rowwise.triton import _pdl_enter, _tanh, use_pdl
from ...state import MLSTMState
from .skinny import SKINNY_ROWS, _rnd, skinny_linear, skinny_lock_size

__all__ = ["mlstm_head_step", "skinny_linear", "skinny_lock_size", "SKINNY_ROWS", "CONFIG"]

# step: BK rows of Dqk per program (a program holds BK x Dv of C), W warps: 4 warps stream the 7B's
# batch-16 state at 3.31-3.40 TB/s against 2.97-3.01 for 8 (runs 31-33; a persistent walk with the
# next tile loaded ahead, 2-4 programs an SM: 2.3-2.7, run 33). pdl: programmatic dependent launch
# (sm_90+).
CONFIG = dict(pdl=True, step=dict(BK=16, W=4))


def _use_pdl(t: torch.Tensor) -> bool:
    return use_pdl(t, CONFIG["pdl"])


# ------------------------------------------------------------------------------------- helpers

@triton.jit
def _soft_cap(y, cap, dt: tl.constexpr):
    """cap * tanh(y / cap) rounded to dt after each of its three ops, as layers/common.soft_cap's."""
    t = _rnd(_tanh(_rnd(y / cap, dt)), dt)
    return _rnd(t * cap, dt)


# ------------------------------------------------------------------------ mLSTM step + head norm

@triton.jit
def _head_out(num, qn, m_new, row, hd, b, ov, mv, hw_ptr, hb_ptr, out_ptr, o_off, eps, norm_eps,
              H: tl.constexpr, V: tl.constexpr, HAS_HB: tl.constexpr):
    """h = num / den of one head, then LayerNorm over Dv, x weight (+ bias), x sigmoid(o)."""
    dt: tl.constexpr = out_ptr.dtype.element_ty
    den = tl.maximum(tl.abs(qn), tl.exp(-m_new)) + eps
    h = _rnd(num / den, dt)                                # the step's h, in the model dtype
    mean = tl.sum(tl.where(mv, h, 0.0), 0) / V
    xc = tl.where(mv, h - mean, 0.0)
    hn = _rnd(xc * tl.rsqrt(tl.sum(xc * xc, 0) / V + norm_eps), dt)
    hn = _rnd(hn * tl.load(hw_ptr + hd * V + ov, mask=mv, other=0.0).to(tl.float32), dt)
    if HAS_HB:
        hn = _rnd(hn + tl.load(hb_ptr + hd * V + ov, mask=mv, other=0.0).to(tl.float32), dt)
    og = _rnd(tl.sigmoid(tl.load(row + o_off + hd * V + ov, mask=mv, other=0.0).to(tl.float32)), dt)
    tl.store(out_ptr + b * (H * V) + hd * V + ov, (og * hn).to(dt), mask=mv)


@triton.jit
def _load_state(c_ptr, n_ptr, m_ptr, coff, cm, bh, ok, mk, K: tl.constexpr):
    """A program's rows of C and n, and its head's m."""
    return (tl.load(c_ptr + coff, mask=cm, other=0.0), tl.load(n_ptr + bh * K + ok, mask=mk, other=0.0),
            tl.load(m_ptr + bh))


@triton.jit
def _step_kernel(
    y_ptr, c_ptr, n_ptr, m_ptr, c_out, n_out, m_out, hw_ptr, hb_ptr, out_ptr, wsn_ptr, wsq_ptr, lock_ptr,
    ldy, q_off, k_off, v_off, o_off, i_off, f_off, scale, eps, norm_eps, cap,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NSP: tl.constexpr,
    HAS_HB: tl.constexpr, CAP: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
):
    """Grid (cdiv(K, BK), B * H): a program updates BK rows of one head's C (all Dv columns) and
    n, and forms its part of q~ C' and q~ . n'; the last program of the head sums the parts in
    order and writes the normalised, gated output row. EARLY: the state is loaded before the
    wait on the previous launch (which then must not be the one that wrote it)."""
    s = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hd = bh % H
    NS: tl.constexpr = (K + BK - 1) // BK
    ok = s * BK + tl.arange(0, BK)
    mk = ok < K
    ov = tl.arange(0, BV)
    mv = ov < V
    cm = mk[:, None] & mv[None, :]
    coff = bh * K * V + ok[:, None] * V + ov[None, :]
    if EARLY:
        c, n, m = _load_state(c_ptr, n_ptr, m_ptr, coff, cm, bh, ok, mk, K)
    _pdl_enter(PDL)
    if not EARLY:                                          # the state may be the previous launch's output
        c, n, m = _load_state(c_ptr, n_ptr, m_ptr, coff, cm, bh, ok, mk, K)
    row = y_ptr + b * ldy
    ig = tl.load(row + i_off + hd).to(tl.float32)
    fg = tl.load(row + f_off + hd).to(tl.float32)
    if CAP:                                                # the gates' soft caps, where no GEMV applied them
        ig = _soft_cap(ig, cap, y_ptr.dtype.element_ty)
        fg = _soft_cap(fg, cap, y_ptr.dtype.element_ty)
    lf = _logsigmoid(fg)
    m_new = tl.maximum(lf + m, ig)
    fa = tl.exp(lf + m - m_new)
    ia = tl.exp(ig - m_new)
    q = tl.load(row + q_off + hd * K + ok, mask=mk, other=0.0).to(tl.float32) * scale
    k = tl.load(row + k_off + hd * K + ok, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(row + v_off + hd * V + ov, mask=mv, other=0.0).to(tl.float32)
    c = fa * c + ia * k[:, None] * v[None, :]
    tl.store(c_out + coff, c, mask=cm)
    n = fa * n + ia * k
    tl.store(n_out + bh * K + ok, n, mask=mk)
    if s == 0:
        tl.store(m_out + bh, m_new)
    num = tl.sum(q[:, None] * c, 0)
    qn = tl.sum(q * n, 0)
    if NS == 1:
        _head_out(num, qn, m_new, row, hd, b, ov, mv, hw_ptr, hb_ptr, out_ptr, o_off, eps, norm_eps, H, V, HAS_HB)
    else:
        tl.store(wsn_ptr + (bh * NS + s) * BV + ov, num)
        tl.store(wsq_ptr + bh * NS + s, qn)
        tl.debug_barrier()
        if tl.atomic_add(lock_ptr + bh, 1, sem="acq_rel") == NS - 1:
            js = tl.arange(0, NSP)
            parts = tl.load(wsn_ptr + (bh * NS + js)[:, None] * BV + ov[None, :], mask=(js < NS)[:, None],
                            other=0.0, cache_modifier=".cg")
            qn = tl.sum(tl.load(wsq_ptr + bh * NS + js, mask=js < NS, other=0.0, cache_modifier=".cg"), 0)
            tl.store(lock_ptr + bh, 0)
            _head_out(tl.sum(parts, 0), qn, m_new, row, hd, b, ov, mv, hw_ptr, hb_ptr, out_ptr, o_off, eps,
                      norm_eps, H, V, HAS_HB)


def mlstm_head_step(y, sizes, state, head_w, head_b=None, *, num_heads: int, eps: float, norm_eps: float,
                    gate_cap: float | None = None, lock=None, early_state: bool = False, inplace: bool = False):
    """The mLSTM step on the input projection's output, then the layer's output before out_proj.

    y: (B, Nin), the columns q | k | v | o | i | f of widths ``sizes`` (q, k: H*Dqk, v, o: H*Dv,
    i, f: H; i and f already soft-capped, or capped here with ``gate_cap``); state: MLSTMState
    (c (B, H, Dqk, Dv), n, m), float32.
    Returns sigmoid(o) * head_layer_norm(h) (B, H*Dv) in y's dtype and the new state (new
    tensors unless ``inplace``). h is rounded to y's dtype first, as the model's step returns it.
    early_state: the state was not written by the launch right before this one (the input
    projection's, as in generation/fused.py), so with PDL it is read while that launch drains.
    inplace: the new C and n are written over the state's own (float32, contiguous) tensors, which
    the returned state then holds (a program reads and writes only its own rows of them); m, read by
    every program of a head, is always a new tensor."""
    B = y.shape[0]
    H = num_heads
    K, V = sizes[0] // H, sizes[2] // H
    if len(sizes) != 6 or sizes[1] != sizes[0] or sizes[3] != sizes[2] or sizes[4] != H or sizes[5] != H:
        raise ValueError(f"sizes must be (H*Dqk, H*Dqk, H*Dv, H*Dv, H, H), got {tuple(sizes)}")
    if y.dim() != 2 or y.shape[1] != sum(sizes):
        raise ValueError(f"y must be (B, {sum(sizes)}), got {tuple(y.shape)}")
    c, n, m = (t.to(torch.float32).contiguous() for t in state)
    if tuple(c.shape) != (B, H, K, V):
        raise ValueError(f"state.c must be {(B, H, K, V)}, got {tuple(c.shape)}")
    y = y.contiguous()
    cfg = CONFIG["step"]
    BK, BV = min(cfg["BK"], triton.next_power_of_2(K)), triton.next_power_of_2(V)
    NS = triton.cdiv(K, BK)
    c_out, n_out = (c, n) if inplace else (torch.empty_like(c), torch.empty_like(n))
    m_out = torch.empty_like(m)
    out = torch.empty(B, H * V, device=y.device, dtype=y.dtype)
    wsn = torch.empty(B * H * NS * BV, device=y.device, dtype=torch.float32)
    wsq = torch.empty(B * H * NS, device=y.device, dtype=torch.float32)
    if lock is None:
        lock = torch.zeros(B * H, device=y.device, dtype=torch.int32)
    elif lock.numel() < B * H or lock.dtype != torch.int32:
        raise ValueError(f"lock must be int32 zeros of at least {B * H} elements")
    offs = [0]
    for w in sizes[:-1]:
        offs.append(offs[-1] + w)
    kw = dict(num_warps=cfg["W"])
    if _use_pdl(y):
        kw["launch_pdl"] = True
    _step_kernel[(NS, B * H)](
        y, c, n, m, c_out, n_out, m_out, head_w, head_b if head_b is not None else head_w, out, wsn, wsq, lock,
        y.shape[1], *offs, K ** -0.5, float(eps), float(norm_eps), float(gate_cap or 1.0),
        H=H, K=K, V=V, BK=BK, BV=BV, NSP=triton.next_power_of_2(NS), HAS_HB=head_b is not None,
        CAP=bool(gate_cap), PDL="launch_pdl" in kw, EARLY=early_state and "launch_pdl" in kw, **kw)
    return out, MLSTMState(c_out, n_out, m_out)
