"""Triton mLSTM backend: chunkwise forward and exact backward as torch.library custom ops
(so torch.compile traces them without graph breaks), and the fused decode step.

Every sequence, dense or packed, is handled as packed: a dense (B, T) batch is B sequences of T
tokens at offsets cu_seqlens = [0, T, 2T, ...]. The kernels compute in fp32 with matmul operands
in the input dtype (bf16 / fp16; fp32 inputs get exact fp32 dots, not tf32), states are always
fp32. Chunk size 128 is the fastest on the H200 at the 7B head shape (benchmarks/RESULTS.md).
Tile sizes live in CONFIG so benchmarks can sweep them; they never change results beyond rounding.
"""

import functools
import math
import os
from typing import Optional

import torch
import triton
from torch import Tensor

from ...state import MLSTMState
from .. import triton_takes_chunk
from . import bwd, fwd, step

__all__ = ["mlstm", "mlstm_step", "CONFIG"]

# BT: rows per intra-chunk block; BK / BV: tiles of Dqk / Dv; W*: num_warps; S*: num_stages.
# Defaults: the best of the H200 sweep at the 7B head shape, chunk 128 (benchmarks/NOTES-kernels.md).
CONFIG = dict(
    fwd_state=dict(BK=64, BV=128, W=4, S=2),
    # fwd_out_short below chunk 128: with num_stages=2 triton 3.6 gives wrong h at chunk 64 with
    # Dqk 256 / Dv 512 in bf16 (rel error 0.2-0.3 on the H200, measured twice on 2026-11-28, while
    # chunk 128 agrees to 2e-5); one stage is exact there (benchmarks/NOTES-kernels.md).
    # Four warps and Dv tiles of 128 (two programs per SM): -0.13..0.24 ms at chunk 128 and
    # -0.23 ms at chunk 64 against 8 warps x 256 (runs 16, 17).
    # P: the intra-chunk score blocks formed once by _score_blocks_kernel (fwd_scores' tiles) and
    # read by the output kernel, instead of once per Dv tile there: goal shape 2.70 -> 2.41 ms at
    # chunk 128, 3.12 -> 2.82 at chunk 64, 1.3b training shape 0.59 -> 0.55 (run 23, one process).
    fwd_out=dict(BT=64, BK=128, BV=128, W=4, S=2, P=True),
    fwd_out_short=dict(BT=64, BK=128, BV=128, W=4, S=1, P=True),
    fwd_scores=dict(BK=64, W=4, S=2),
    bwd_state=dict(BK=64, BV=128, W=8, S=2),
    # the backward's intra-chunk row blocks are bwd_scores' BT (dq/dk and dv read its blocks)
    # 4 warps and 3 stages for the three, dv at 64 x 64 (run 77, .diag/tiles11.py, one process, outputs
    # within 9e-9): all mLSTM kernels fwd+bwd 7.06 -> 6.74 ms at the goal shape, 1.88 -> 1.79 ms at the
    # 1.3b training shape B8 S4096 H4 (was dq/dk 8 warps, dv 128 x 128 / 8 warps / 2 stages, scores 2 stages)
    bwd_scores=dict(BT=64, BK=64, BV=64, W=4, S=3),
    bwd_dqk=dict(BK=64, BV=64, W=4, S=3),
    bwd_dv=dict(BK=64, BV=64, W=4, S=3),
    # *_short: below chunk 128. At the 1.3b training shape (B4 S4096 H4 256/512, chunk 64) dq/dk at 4
    # warps takes 338 against 381 us, dv at 64 x 128, 3 stages 110 against 123 (run 40, outputs equal)
    bwd_dqk_short=dict(BK=64, BV=64, W=4, S=3),
    bwd_dv_short=dict(BK=64, BV=128, W=8, S=3),
    stab=dict(BLOCK=256),          # chunks per block of the stabiliser's max-plus scan
    gate=dict(BLOCK=1024),         # tokens per block of the gate gradients' backward walk
    step=dict(BK=32, BV=64, W=4),
)


def mlstm(q, k, v, i, f, state: Optional[MLSTMState] = None, *, chunk_size: int = 64, eps: float = 1e-6,
          cu_seqlens: Optional[Tensor] = None):
    """Chunkwise mLSTM (contract of ``reference.mlstm``), exact gradients for all inputs and the
    initial state. With ``cu_seqlens`` (int, (N + 1,), from 0 to T), q ... f hold N documents
    packed along T of a batch of one; the state restarts at every document (the initial and final
    states then have batch N)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check(q, k, v, chunk_size)
    dt = q.dtype
    k, v = k.to(dt), v.to(dt)
    if cu_seqlens is None:
        # not cached while compiling (traced into the graph) or capturing (it would live in the graph's pool)
        fresh = torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
        table = (_dense_chunk_table if fresh else _cached_dense_chunk_table)(B, T, chunk_size, q.device)
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens needs a batch of one packed sequence, got B={B}")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        lens = (cu[1:] - cu[:-1]).tolist()
        table = _packed_chunk_table(cu, sum(-(-n // chunk_size) for n in lens), chunk_size)
    cu = table[0]
    N = cu.numel() - 1
    qkvif = (q.contiguous(), k.contiguous(), v.contiguous(), i.to(torch.float32).contiguous(),
             f.to(torch.float32).contiguous())
    # Without autograd or tracing the kernels are called directly: the custom op's dispatch is host
    # time before the first kernel, which a synchronous call (prefill, a no-grad forward) waits on.
    direct = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (any(t.requires_grad for t in qkvif)
                                     or (state is not None and any(t.requires_grad for t in state))))
    if state is None and direct:
        c0 = n0 = m0 = None             # the kernels start from zeros without reading a state
    else:
        if state is None:
            state = MLSTMState.zeros(N, H, K, V, device=q.device)
        c0, n0, m0 = (t.to(torch.float32).contiguous() for t in state)
    if T == 0:
        if c0 is None:
            c0, n0, m0 = MLSTMState.zeros(N, H, K, V, device=q.device)
        return q.new_zeros(B, 0, H, V), MLSTMState(c0, n0, m0)
    args = (*qkvif, c0, n0, m0)
    out = (_chunkwise_forward if direct else torch.ops.fastxlstm.mlstm_chunkwise)(*args, *table, chunk_size, eps)
    return out[0], MLSTMState(out[1], out[2], out[3])


def mlstm_step(q, k, v, i, f, state: Optional[MLSTMState] = None, *, eps: float = 1e-6, inplace: bool = False):
    """One decode step (contract of ``reference.mlstm_step``). ``inplace=True`` writes the new
    state into ``state``'s tensors (fp32, contiguous) and returns them; otherwise new buffers."""
    B, H, K = q.shape
    V = v.shape[-1]
    _check_device(q)
    _check_dtype(q)
    if state is None:
        if inplace:
            raise ValueError("inplace=True needs a state to update")
        state = MLSTMState.zeros(B, H, K, V, device=q.device)
    c, n, m = state
    if inplace:
        for name, t in zip("cnm", state):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"inplace step needs a contiguous float32 state.{name}, got {t.dtype}")
        c_out, n_out, m_out = c, torch.empty_like(n), torch.empty_like(m)
    else:
        c, n, m = (t.to(torch.float32).contiguous() for t in state)
        c_out, n_out, m_out = torch.empty_like(c), torch.empty_like(n), torch.empty_like(m)
    h = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    cfg = CONFIG["step"]
    BK, BV = _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
    step._step_kernel[(triton.cdiv(V, BV), B * H)](
        q.contiguous(), k.contiguous(), v.contiguous(), i.contiguous(), f.contiguous(), c, n, m,
        c_out, n_out, m_out, h, K ** -0.5, eps, K=K, V=V, BK=BK, BV=BV, num_warps=cfg["W"])
    if inplace:
        n.copy_(n_out)
        m.copy_(m_out)
        return h, state
    return h, MLSTMState(c_out, n_out, m_out)


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("fastxlstm::mlstm_chunkwise", mutates_args=())
def _chunkwise(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, c0: Tensor, n0: Tensor, m0: Tensor,
               cu: Tensor, start: Tensor, end: Tensor, first: Tensor, doc: Tensor, chunk_size: int, eps: float
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns h, final (c, n, m) and, for the backward, chunk-start states (c, n), per-chunk
    scalars (m_start, g, m_end) and per-token scalars (b, m, s, and scratch). The chunk table
    (start, end, document per chunk; first chunk per document) comes from _packed_chunk_table."""
    return _chunkwise_forward(q, k, v, i, f, c0, n0, m0, cu, start, end, first, doc, chunk_size, eps)


def _chunkwise_forward(q, k, v, i, f, c0, n0, m0, cu, start, end, first, doc, chunk_size, eps):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    T_all, L = B * T, chunk_size
    num_chunks = start.numel()
    # As little as possible before the first launch: a synchronous call leaves the GPU idle until
    # then, so host time before it is paid in full (~7 µs per allocation, ~30 µs per launch, measured
    # on the H200); later host work overlaps the kernels. c0 = n0 = m0 = None: a zero initial state.
    chs = q.new_empty(num_chunks, H, 3, dtype=torch.float32)
    tok = q.new_empty(4, H, T_all, dtype=torch.float32)   # per token b, m, s and (scratch) cm
    kw = torch.empty_like(k)
    ns = q.new_empty(num_chunks, H, K, dtype=torch.float32)
    fwd._chunk_gate_kernel[(triton.cdiv(K, 64), num_chunks, H)](k, i, f, start, end, chs, tok, kw, ns, T_all, H=H, K=K,
                                                                L=L, BK=64, num_warps=4)
    init = c0 is not None                  # None: a zero initial state, never materialised
    if not init:
        c0 = n0 = m0 = q.new_empty(0, dtype=torch.float32)
    mT = q.new_empty(N, H, dtype=torch.float32)
    fwd._chunk_stab_kernel[(N * H,)](m0, cu, first, chs, mT, H=H, L=L, BLOCK=CONFIG["stab"]["BLOCK"], INIT=init,
                                     num_warps=4)
    cs = q.new_empty(num_chunks, H, K, V, dtype=_chunk_state_dtype(q))
    cT = q.new_empty(N, H, K, V, dtype=torch.float32)
    nT = q.new_empty(N, H, K, dtype=torch.float32)
    h = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    prec = _precision(q)
    cfg = _tiles("fwd_state", q)
    BK, BV = _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
    fwd._state_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), N * H)](
        kw, v, c0, n0, cu, first, chs, tok, cs, ns, cT, nT, T_all,
        H=H, K=K, V=V, L=L, BK=BK, BV=BV, PREC=prec, INIT=init, num_warps=cfg["W"], num_stages=cfg["S"])
    del kw
    cfg = _tiles("fwd_out", q, L)
    BT, BK, BV = min(cfg["BT"], L), _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
    stored_p = cfg.get("P", False)
    p_blk = None
    if stored_p:
        # per chunk and head the L x L gated score blocks (those at or below the diagonal written)
        p_blk = q.new_empty(num_chunks, H, L, L)
        sc = CONFIG["fwd_scores"]
        fwd._score_blocks_kernel[(num_chunks * (L // BT), H)](
            q, k, i, chs, tok, start, end, p_blk, K ** -0.5, T_all, H=H, K=K, L=L, BT=BT,
            BK=_tile(K, sc["BK"]), PREC=prec, num_warps=sc["W"], num_stages=sc["S"])
    fwd._out_kernel[(triton.cdiv(V, BV), num_chunks * (L // BT), H)](
        q, k, v, i, cs, ns, chs, tok, start, end, h, p_blk if stored_p else h, K ** -0.5, eps, T_all,
        H=H, K=K, V=V, L=L, BT=BT, BK=BK, BV=BV, PREC=prec, STORED_P=stored_p,
        num_warps=cfg["W"], num_stages=cfg["S"])
    return h, cT, nT, mT, cs, ns, chs, tok


@_chunkwise.register_fake
def _(q, k, v, i, f, c0, n0, m0, cu, start, end, first, doc, chunk_size, eps):
    B, T, H, K = q.shape
    num_chunks = start.shape[0]
    V = v.shape[-1]
    sdt = _chunk_state_dtype(q)
    return (q.new_empty(B, T, H, V), torch.empty_like(c0), torch.empty_like(n0), torch.empty_like(m0),
            q.new_empty(num_chunks, H, K, V, dtype=sdt), q.new_empty(num_chunks, H, K, dtype=torch.float32),
            q.new_empty(num_chunks, H, 3, dtype=torch.float32), q.new_empty(4, H, B * T, dtype=torch.float32))


@torch.library.custom_op("fastxlstm::mlstm_chunkwise_bwd", mutates_args=())
def _chunkwise_bwd(dh: Tensor, dcT: Tensor, dnT: Tensor, dmT: Tensor, q: Tensor, k: Tensor, v: Tensor,
                   i: Tensor, f: Tensor, c0: Tensor, n0: Tensor, m0: Tensor, h: Tensor, cT: Tensor,
                   nT: Tensor, cs: Tensor, ns: Tensor, chs: Tensor, tok: Tensor, cu: Tensor, start: Tensor,
                   end: Tensor, first: Tensor, doc: Tensor, chunk_size: int, eps: float, has_dstate: bool,
                   state_grad: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (q, k, v, i, f, c0, n0, m0); ``has_dstate``: whether the final state had
    gradients (dcT etc. are zeros otherwise); ``state_grad``: whether the initial state's are
    wanted (dm0 skips its first-chunk work otherwise and is then meaningless)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    T_all, L = B * T, chunk_size
    num_chunks = start.numel()
    scale = K ** -0.5
    scal = q.new_empty(4, H, T_all, dtype=torch.float32)
    bwd._prep_kernel[(triton.cdiv(T_all, 64), H)](dh, h, tok, scal, eps, T_all, H=H, V=V, BT=64,
                                                   BV=_tile(V, 64), num_warps=4)
    dcs = torch.empty_like(cs)
    dns = torch.empty_like(ns)
    dc0, dn0 = torch.empty_like(c0), torch.empty_like(n0)
    prec = _precision(q)
    cfg = _tiles("bwd_state", q)
    BK, BV = _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
    qw = torch.empty_like(q)
    bwd._query_weight_kernel[(triton.cdiv(K, 64), num_chunks, H)](q, tok, scal, chs, start, end, qw, dns, scale,
                                                                  T_all, H=H, K=K, L=L, BK=64, num_warps=4)
    dcf, dnf = torch.empty_like(c0), torch.empty_like(n0)     # dC_end, dn_end of each document's first chunk
    for first_chunk, ins, outs in ((False, (dcT, dnT), (dcf, dnf)), (True, (dcf, dnf), (dc0, dn0))):
        bwd._state_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), N * H)](
            qw, dh, chs, cu, first, *ins, dcs, dns, *outs,
            H=H, K=K, V=V, L=L, BK=BK, BV=BV, PREC=prec, FIRST=first_chunk, num_warps=cfg["W"], num_stages=cfg["S"])
    del qw
    cfg = _tiles("bwd_scores", q)
    BT, BK, BV = min(cfg["BT"], L), _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
    NSUB = L // BT
    # per chunk and head the L x L blocks of P and dP~ (only those at or below the diagonal are written)
    p_blk = q.new_empty(num_chunks, H, L, L)
    dpw_blk = q.new_empty(num_chunks, H, L, L)
    kdk_intra = q.new_zeros(NSUB, H, T_all, dtype=torch.float32)
    xy = q.new_empty(2, H, T_all if state_grad else 0, dtype=torch.float32)   # per token the sums dm0 needs
    bwd._scores_kernel[(num_chunks * NSUB, H)](
        q, k, v, i, dh, tok, scal, start, end, p_blk, dpw_blk, kdk_intra, xy, scale, T_all,
        H=H, K=K, V=V, L=L, BT=BT, BK=BK, BV=BV, PREC=prec, XY=state_grad, num_warps=cfg["W"], num_stages=cfg["S"])
    cfg = _tiles("bwd_dqk", q, L)
    BK, BV = _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
    NKT = triton.cdiv(K, BK)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    kdk_inter = q.new_empty(NKT, H, T_all, dtype=torch.float32)
    has_lo = q.dtype != torch.float32 and has_dstate
    dlo = (dcT - dcT.to(q.dtype).float()).to(q.dtype) if has_lo else dcT
    edot = q.new_empty(num_chunks, H, NKT, dtype=torch.float32)
    bwd._dqk_kernel[(NKT, num_chunks * NSUB, H)](
        q, k, v, dh, cs, ns, dcs, dns, chs, tok, scal, i, start, end, cu, first, doc, dpw_blk, dq, dk, kdk_inter,
        dlo, edot,
        scale, T_all, H=H, K=K, V=V, L=L, BT=BT, BK=BK, BV=BV, PREC=prec, HAS_LO=has_lo,
        num_warps=cfg["W"], num_stages=cfg["S"])
    del dpw_blk
    cfg = _tiles("bwd_dv", q, L)
    BK, BV = _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
    dv = torch.empty_like(v)
    bwd._dv_kernel[(triton.cdiv(V, BV), num_chunks * NSUB, H)](
        k, i, dh, dcs, chs, tok, start, end, p_blk, dv, T_all,
        H=H, K=K, V=V, L=L, BT=BT, BK=BK, BV=BV, PREC=prec, num_warps=cfg["W"], num_stages=cfg["S"])
    del p_blk
    di, df, dm0 = torch.empty_like(i), torch.empty_like(f), torch.empty_like(m0)
    bwd._gate_grad_kernel[(N * H,)](
        i, f, m0, dmT, tok, scal, kdk_inter, kdk_intra, edot, chs, cu, first,
        c0, n0, xy, q, dh, dcf, dnf, dcT, dnT, cs, ns, di, df, dm0, scale, T_all, H=H, K=K, V=V, L=L,
        BLOCK=max(L, CONFIG["gate"]["BLOCK"]), NKT=NKT, NSUB=NSUB, BK=_tile(K, 32), BV=_tile(V, 32), STATE_GRAD=state_grad,
        num_warps=8)
    return dq, dk, dv, di, df, dc0, dn0, dm0


@_chunkwise_bwd.register_fake
def _(dh, dcT, dnT, dmT, q, k, v, i, f, c0, n0, m0, *rest):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(i),
            torch.empty_like(f), torch.empty_like(c0), torch.empty_like(n0), torch.empty_like(m0))


def _setup_context(ctx, inputs, output):
    q, k, v, i, f, c0, n0, m0, cu, start, end, first, doc, chunk_size, eps = inputs
    h, cT, nT, mT, cs, ns, chs, tok = output
    ctx.save_for_backward(q, k, v, i, f, c0, n0, m0, h, cT, nT, cs, ns, chs, tok, cu, start, end, first, doc)
    ctx.args = (chunk_size, eps)
    # the saved-for-backward outputs never get gradients: without this autograd would hand the
    # backward zero tensors for them, the chunk states' alone ~1 GiB of fill at the 7B goal shape
    ctx.set_materialize_grads(False)


def _backward(ctx, dh, dcT, dnT, dmT, *unused):
    q, k, v, i, f, c0, n0, m0, h, cT, nT, cs, ns, chs, tok, *table = ctx.saved_tensors
    has_dstate = dcT is not None or dnT is not None or dmT is not None
    state_grad = any(ctx.needs_input_grad[5:8])
    dh = torch.zeros_like(h) if dh is None else dh.to(h.dtype).contiguous()
    dcT = torch.zeros_like(cT) if dcT is None else dcT.float().contiguous()
    dnT = torch.zeros_like(nT) if dnT is None else dnT.float().contiguous()
    dmT = torch.zeros_like(m0) if dmT is None else dmT.float().contiguous()
    grads = torch.ops.fastxlstm.mlstm_chunkwise_bwd(dh, dcT, dnT, dmT, q, k, v, i, f, c0, n0, m0, h, cT, nT,
                                                   cs, ns, chs, tok, *table, *ctx.args, has_dstate, state_grad)
    if not state_grad:
        grads = (*grads[:5], None, None, None)
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("fastxlstm::mlstm_chunkwise", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- helpers

def _dense_chunk_table(B: int, T: int, L: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The table of a dense batch: B documents of T tokens."""
    cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
    return _packed_chunk_table(cu, B * math.ceil(T / L), L)


# A dense batch's table depends on (B, T, L) only: built once, not with ~15 small launches per call
# (the host time of a call showed on the GPU's timeline as ~0.7 ms idle at the goal shape).
_cached_dense_chunk_table = functools.lru_cache(maxsize=64)(_dense_chunk_table)


def _packed_chunk_table(cu: Tensor, num_chunks: int, L: int):
    """cu, and per chunk its first and one-past-last token and its document; per document its
    first chunk."""
    lens = cu[1:] - cu[:-1]
    n_ch = (lens + L - 1) // L
    first = torch.cumsum(n_ch, 0) - n_ch
    seq = torch.repeat_interleave(torch.arange(n_ch.numel(), device=cu.device), n_ch, output_size=num_chunks)
    start = cu[seq] + (torch.arange(num_chunks, device=cu.device) - first[seq]) * L
    end = torch.minimum(start + L, cu[seq + 1])
    return cu, start, end, first, seq


def _tiles(name: str, q, chunk_size: int = 128) -> dict:
    """CONFIG's tiles for a kernel (its ``_short`` entry below chunk 128, where there is one);
    fp32 operands take twice the shared memory per tile, so they get one pipeline stage and Dv
    tiles of at most 64 (the bf16 defaults overflow the H200's 227 KiB at chunk 256 with fp32 inputs)."""
    short = f"{name}_short"
    cfg = dict(CONFIG[short if chunk_size < 128 and short in CONFIG else name])
    if q.dtype == torch.float32:
        cfg["S"] = 1
        cfg["BV"] = min(cfg["BV"], 64)
    return cfg


def _chunk_state_dtype(q) -> torch.dtype:
    # bf16 chunk states halve their memory and traffic; fp32 ones measured no more accurate (the
    # dots round them to the operand dtype anyway). fp16 keeps fp32: its range is too small.
    return torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32


def _precision(q) -> str:
    # fp32 inputs get exact fp32 dots (the fp32 contract); bf16/fp16 operands are exact in tf32 mode.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _tile(d: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(d)))


def _check_device(q):
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")


def _check_dtype(q):
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the triton backend takes float32, bfloat16 or float16 inputs, got {q.dtype}")


def _check(q, k, v, chunk_size):
    _check_device(q)
    _check_dtype(q)
    if not triton_takes_chunk(chunk_size):
        raise ValueError(f"the triton backend needs a power-of-two chunk_size >= 16, got {chunk_size}")
