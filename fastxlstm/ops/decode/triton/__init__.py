"""Triton kernels for small-batch decoding: a transformer-style block of XLSTMLarge in five launches.

At batch 1 a decode step reads every weight once and does almost nothing else, so its speed is
the weight stream's: what costs is each kernel's launch gap, ramp and tail, and GEMVs that do not
keep HBM busy. These kernels cut a block to

    norm_linear      [x + d] -> RMSNorm -> ONE GEMV over q|k|v|o|i|f (+ bias), gate soft caps
    mlstm_head_step  the mLSTM step -> per-head LayerNorm -> x sigmoid(o)
    linear           out_proj (+ bias) + the residual x
    norm_swiglu      RMSNorm -> GEMV over gate|up -> silu(gate) * up
    linear           proj_down (its residual add is the next block's norm_linear)

and the LM head is one more norm_linear (logit soft cap, float32 out).

GEMV (_gemv_kernel), persistent and stream-K: a tile is BN output rows of one BM-row batch tile, an
iteration one BK slice of its K; the iterations of all tiles are cut into equal contiguous ranges,
one per program (a few programs per SM), so every SM streams the same number of bytes whatever
the shape (no tail wave). Triton does not pipeline loads that feed no dot, so the weight tiles of
the next D iterations (1 or 2) are loaded by hand before the current one is used. At M == 1 a program
multiplies and reduces in registers; at M > 1 it uses tl.dot with the batch padded to BM = 16 (the
weights are the dot's M side). A tile covered by one program gets its epilogue at once; a tile
shared by several gets fp32 partials, and the last of them to finish (a per-tile counter) sums
them in program order and applies the epilogue: deterministic, and one launch. That program also
resets the counter, so the ``lock`` buffer is all zeros between launches.

RMSNorm inside the GEMV: y = W (x * rstd * w_norm) = rstd * (W (x * w_norm)), so a program needs
no pre-pass over x: it accumulates sum(x^2) alongside the dot and scales at the end (split
programs add their partial sums). The model rounds the normalised x to its dtype before the GEMM;
here it is not rounded (M == 1) or rounded once (the dot operand): the same function, rounded
differently, within the dtype's tolerance. A norm *bias* does not factor out: callers fold it into
the linear bias (b + W @ norm_bias), as generation/fused.py does.

Programmatic dependent launch (PDL, sm_90+): every kernel is launched allowed to start while the
previous one drains. Before ``gdc_wait`` it reads weights only (no kernel writes them), then lets
the next kernel launch. Each kernel waits before it finishes, so the chain stays ordered.

Layouts: x, d (M, K), weights (N, K) row-major (nn.Linear), outputs (M, N), all contiguous.
The epilogues round where the model's eager ops round (each bf16 op rounds its result), so the
kernels compute the model's function to its dtype's rounding. No autograd: decoding only.

Measured (H200, torch 2.11, triton 3.6, 7B shape, random bf16 weights, copy 4.24 TB/s, roofline 312
tokens/s at batch 1; .diag/decode_bench.py, 2026-11-28, one run each):
- batch 1, 16 chained steps in one CUDA graph: these kernels 218 tokens/s with PDL (70% of the
  roofline), 207 without; the compiled pieces + cuBLAS 202 (65%); generate() 214. 162 kernels a
  step (5 a block) against 452. Kernel times sum to the step time: the launch gaps are gone, and
  what is left is each GEMV's bandwidth: per block in 38 us (2.6 TB/s), step 6 us, out_proj 16 us
  (2.2 TB/s), gate|up 58 us (3.1), down 28 us (3.2); head 129 us (3.2). cuBLAS streams the same
  weights at 3.45 (in), 2.47 (out), 3.87 (gate|up), 3.23 (down), 3.93 TB/s (head). Logits against
  the model's own step: rel. L2 2.9e-2 at batch 1 and 16, as for the compiled pieces (random
  init, 32 bf16 blocks).
- tiles (B = 1, TB/s of each GEMV over the 32 blocks in one graph): BN 8 x BK 512, 4 warps, one
  tile loaded ahead is the best for in/down/head; two ahead costs 5-15% (registers: 4 programs an
  SM either way); more, shorter programs (waves 4, 16) and 8 warps are worse; gate|up is best with
  BN 2 x BK 1024, two ahead (3.25). The first design of these kernels, one program per tile of BN
  rows x all of K (no x prefetch, 96 registers), streamed in / out / down at 2.99 / 2.98 / 3.52
  TB/s with BN 8 x BK 512 in the same kind of measurement, better than this persistent cut (2.75 /
  2.44 / 3.30), but was timed end to end only at worse tiles (193 tokens/s). per_tile=True gives
  that grid with this kernel: not yet measured on a GPU, the next thing to time.
- batch 16 (the dot path, forced): 2105 tokens/s without PDL, 1817 with, against 2555 for cuBLAS
  (an earlier tiling, same run as above: batch 4 563 against 759, batch 8 1063 against 1441):
  the weights reach the dot through registers (Triton does not pipeline this loop), so the
  default keeps cuBLAS above batch 1 (generation/fused.py, ``max_kernel_batch``; its hybrid path,
  cuBLAS with the row and step kernels between, is slower at batch 1: 222 against 231 tokens/s for
  these kernels, both in one process, run 26).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from ...mlstm.triton.fwd import _logsigmoid
from ...rowwise.triton import _pdl_enter, _tanh, use_pdl
from ...state import MLSTMState
from .skinny import SKINNY_ROWS, skinny_linear, skinny_lock_size

__all__ = ["norm_linear", "linear", "norm_swiglu", "mlstm_head_step", "lock_size", "skinny_linear",
           "skinny_lock_size", "SKINNY_ROWS", "CONFIG"]

# GEMV tiles. m1: M == 1 (broadcast multiply-reduce); mn: M > 1 (tl.dot, batch padded to 16);
# _glu: the gate|up GEMV (two weight tiles a step). BN rows x BK of K a step, W warps, at most
# ctas programs per SM, waves rounds of them; D weight tiles loaded ahead by hand, S pipeline
# stages (the compiler's, dot operands only). per_tile: one program per tile instead (no tile shared;
# more programs than fit at once). shapes: overrides per "path NxK".
# step: BK rows of Dqk per program (a program holds BK x Dv of C), W warps: 4 warps stream the 7B's
# batch-16 state at 3.31-3.40 TB/s against 2.97-3.01 for 8 (runs 31-33; a persistent walk with the
# next tile loaded ahead, 2-4 programs an SM: 2.3-2.7, run 33). pdl: programmatic dependent launch
# (sm_90+). m1 / m1_glu: the best of the H200 sweep at the 7B shapes (see the docstring).
CONFIG = dict(
    pdl=True,
    m1=dict(BN=8, BK=512, W=4, ctas=8, waves=1, D=1, S=1, per_tile=False),
    m1_glu=dict(BN=2, BK=1024, W=4, ctas=8, waves=1, D=2, S=1),
    mn=dict(BN=64, BK=128, W=4, ctas=2, waves=1, D=0, S=3),
    mn_glu=dict(BN=32, BK=128, W=4, ctas=2, waves=1, D=0, S=3),
    # out_proj of the 7B (E 4096): one program per tile streams it at 2.71 TB/s against 2.44 for the
    # persistent cut (run 23, the 32 blocks' weights in one CUDA graph); the other shapes lose with it
    shapes={"m1 4096x4096": dict(per_tile=True)},
    step=dict(BK=16, W=4),
)

_EPI_NONE, _EPI_CAP, _EPI_RESIDUAL, _EPI_SWIGLU = 0, 1, 2, 3
_BM = 16


# ------------------------------------------------------------------------------------- helpers

@triton.jit
def _rnd(x, dtype: tl.constexpr):
    """x rounded to dtype and back to fp32: where an eager bf16 op of the model rounds."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _soft_cap(y, cap, dt: tl.constexpr):
    """cap * tanh(y / cap) rounded to dt after each of its three ops, as layers/common.soft_cap's."""
    t = _rnd(_tanh(_rnd(y / cap, dt)), dt)
    return _rnd(t * cap, dt)


# ---------------------------------------------------------------------------------------- GEMV

@triton.jit
def _gemv_epilogue(y, y2, ss, rn, rm, mn, mm, b_ptr, r_ptr, y_ptr, w_ptr, N, K, up_off, eps, cap, cap_from,
                   NORM: tl.constexpr, HAS_B: tl.constexpr, EPI: tl.constexpr):
    """y, y2: (BN, BM) fp32 sums (y2: the up rows of a SwiGLU); ss: (BM,) sums of x^2."""
    wdt: tl.constexpr = w_ptr.dtype.element_ty
    odt: tl.constexpr = y_ptr.dtype.element_ty
    if NORM:
        rstd = tl.rsqrt(ss / K + eps)
        y = y * rstd[None, :]
        y2 = y2 * rstd[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[:, None]
        if EPI == 3:
            y2 = y2 + tl.load(b_ptr + up_off + rn, mask=mn, other=0.0).to(tl.float32)[:, None]
    y = _rnd(y, wdt)                                       # F.linear's output
    off = rm[None, :] * N + rn[:, None]
    om = mn[:, None] & mm[None, :]
    if EPI == 1:
        y = tl.where((rn >= cap_from)[:, None], _soft_cap(y, cap, odt), y)
    if EPI == 2:
        y = y + tl.load(r_ptr + off, mask=om, other=0.0).to(tl.float32)
    if EPI == 3:
        y = _rnd(y * tl.sigmoid(y), wdt) * _rnd(y2, wdt)
    tl.store(y_ptr + off, y.to(odt), mask=om)


@triton.jit
def _gemv_tile(g, NI, NT, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Global iteration g -> its tile t = (batch tile, row tile), rows rn, batch rows rm, K offsets ok."""
    t = g // NI
    ok = (g - t * NI) * BK + tl.arange(0, BK)
    rn = (t % NT) * BN + tl.arange(0, BN)
    rm = (t // NT) * BM + tl.arange(0, BM)
    return t, rn, rm, ok


@triton.jit
def _gemv_load(g, end, x_ptr, d_ptr, nw_ptr, w_ptr, M, N, K, NI, NT, up_off,
               NORM: tl.constexpr, HAS_D: tl.constexpr, GLU: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The loads of iteration g (nothing past ``end``): weight tile(s) (BN, BK), x and d (BM, BK), norm weight."""
    t, rn, rm, ok = _gemv_tile(g, NI, NT, BM, BN, BK)
    mk = ok < tl.where(g < end, K, 0)                     # past the range: no loads at all
    wm = (rn < N)[:, None] & mk[None, :]
    wp = w_ptr + rn.to(tl.int64)[:, None] * K + ok[None, :]
    w = tl.load(wp, mask=wm, other=0.0)
    w2 = w
    if GLU:
        w2 = tl.load(wp + up_off.to(tl.int64) * K, mask=wm, other=0.0)
    xm = (rm < M)[:, None] & mk[None, :]
    x = tl.load(x_ptr + rm[:, None] * K + ok[None, :], mask=xm, other=0.0)
    d = x
    if HAS_D:
        d = tl.load(d_ptr + rm[:, None] * K + ok[None, :], mask=xm, other=0.0)
    nw = ok
    if NORM:
        nw = tl.load(nw_ptr + ok, mask=mk, other=0.0)
    return w, w2, x, d, nw


@triton.jit
def _gemv_kernel(
    x_ptr, d_ptr, xo_ptr, nw_ptr, w_ptr, b_ptr, r_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, NI, NT, I, MAXC, up_off, eps, cap, cap_from,
    NORM: tl.constexpr, HAS_D: tl.constexpr, HAS_B: tl.constexpr, EPI: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, DEPTH: tl.constexpr, PDL: tl.constexpr,
):
    """y (M, N) = epilogue(W [norm](x (+ d))), stream-K: the I = tiles x NI iterations (a tile is BN
    rows of one BM-row batch tile, an iteration BK of its K) are cut into equal contiguous ranges,
    one per program. A program streams its range with the weights of the next DEPTH iterations in
    flight (DEPTH 0: loaded where used, for the compiler's pipelining of dot operands); a tile it
    covers whole gets its epilogue at once, a tile shared with other programs gets partial sums,
    reduced in program order by the last of them to finish."""
    GLU: tl.constexpr = EPI == 3
    p = tl.program_id(0)
    G = tl.num_programs(0)
    start = p * I // G
    end = (p + 1) * I // G
    # the first weight tiles before the wait: weights never depend on the previous kernel
    if DEPTH >= 1:
        wa, wa2, _, _, _ = _gemv_load(start, end, x_ptr, d_ptr, nw_ptr, w_ptr, M, N, K, NI, NT, up_off,
                                      False, False, GLU, BM, BN, BK)
    if DEPTH == 2:
        wb, wb2, _, _, _ = _gemv_load(start + 1, end, x_ptr, d_ptr, nw_ptr, w_ptr, M, N, K, NI, NT, up_off,
                                      False, False, GLU, BM, BN, BK)
    _pdl_enter(PDL)
    _, _, xa, da, nwa = _gemv_load(start, end, x_ptr, d_ptr, nw_ptr, w_ptr, M, N, K, NI, NT, up_off,
                                   NORM, HAS_D, False, BM, BN, BK)
    if DOT:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BN, BK], dtype=tl.float32)
    acc2 = tl.zeros_like(acc)
    ss = tl.zeros([BM], dtype=tl.float32)
    for g in range(start, end):
        if DEPTH == 0:
            wa, wa2, _, _, _ = _gemv_load(g, end, x_ptr, d_ptr, nw_ptr, w_ptr, M, N, K, NI, NT, up_off,
                                          False, False, GLU, BM, BN, BK)
        if DEPTH == 1:
            wb, wb2, _, _, _ = _gemv_load(g + 1, end, x_ptr, d_ptr, nw_ptr, w_ptr, M, N, K, NI, NT, up_off,
                                          False, False, GLU, BM, BN, BK)
        if DEPTH == 2:
            wc, wc2, _, _, _ = _gemv_load(g + 2, end, x_ptr, d_ptr, nw_ptr, w_ptr, M, N, K, NI, NT, up_off,
                                          False, False, GLU, BM, BN, BK)
        _, _, xb, db, nwb = _gemv_load(g + 1, end, x_ptr, d_ptr, nw_ptr, w_ptr, M, N, K, NI, NT, up_off,
                                       NORM, HAS_D, False, BM, BN, BK)
        t, rn, rm, ok = _gemv_tile(g, NI, NT, BM, BN, BK)
        x = xa.to(tl.float32)
        if HAS_D:                                          # the residual add x + d, in the model dtype
            x = _rnd(x + da.to(tl.float32), x_ptr.dtype.element_ty)
            if t % NT == 0:
                tl.store(xo_ptr + rm[:, None] * K + ok[None, :], x.to(xo_ptr.dtype.element_ty),
                         mask=(rm < M)[:, None] & (ok < K)[None, :])
        if NORM:
            ss += tl.sum(x * x, 1)
            x = x * nwa.to(tl.float32)[None, :]
        if DOT:
            xt = tl.trans(x.to(w_ptr.dtype.element_ty))
            acc += tl.dot(wa, xt, input_precision=PREC)
            if GLU:
                acc2 += tl.dot(wa2, xt, input_precision=PREC)
        else:
            acc += wa.to(tl.float32) * x
            if GLU:
                acc2 += wa2.to(tl.float32) * x
        t_first = t * NI
        if (g == t_first + NI - 1) | (g == end - 1):      # this program's part of tile t is done
            if DOT:
                y = acc
                y2 = acc2
            else:
                y = tl.sum(acc, 1)[:, None]
                y2 = tl.sum(acc2, 1)[:, None]
            mn = rn < N
            mm = rm < M
            if (t_first >= start) & (t_first + NI <= end):
                _gemv_epilogue(y, y2, ss, rn, rm, mn, mm, b_ptr, r_ptr, y_ptr, w_ptr, N, K, up_off, eps, cap,
                               cap_from, NORM, HAS_B, EPI)
            else:
                # partial sums in slot (program - first owner); the last owner to arrive reduces
                p0 = ((t_first + 1) * G - 1) // I
                n_parts = ((t_first + NI) * G - 1) // I - p0 + 1
                P: tl.constexpr = 2 * BN * BM + BM
                yoff = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
                slab = ws_ptr + (t.to(tl.int64) * MAXC + (p - p0)) * P
                tl.store(slab + yoff, y)
                if GLU:
                    tl.store(slab + BN * BM + yoff, y2)
                tl.store(slab + 2 * BN * BM + tl.arange(0, BM), ss)
                tl.debug_barrier()                         # every thread's partials precede the release
                if tl.atomic_add(lock_ptr + t, 1, sem="acq_rel") == n_parts - 1:
                    y = tl.zeros([BN, BM], dtype=tl.float32)
                    y2 = tl.zeros([BN, BM], dtype=tl.float32)
                    sp = tl.zeros([BM], dtype=tl.float32)
                    for j in range(0, n_parts):
                        part = ws_ptr + (t.to(tl.int64) * MAXC + j) * P
                        y += tl.load(part + yoff, cache_modifier=".cg")
                        if GLU:
                            y2 += tl.load(part + BN * BM + yoff, cache_modifier=".cg")
                        sp += tl.load(part + 2 * BN * BM + tl.arange(0, BM), cache_modifier=".cg")
                    tl.store(lock_ptr + t, 0)              # ready for the next launch
                    _gemv_epilogue(y, y2, sp, rn, rm, mn, mm, b_ptr, r_ptr, y_ptr, w_ptr, N, K, up_off, eps,
                                   cap, cap_from, NORM, HAS_B, EPI)
            acc = tl.zeros_like(acc)
            acc2 = tl.zeros_like(acc2)
            ss = tl.zeros_like(ss)
        if DEPTH == 1:
            wa, wa2 = wb, wb2
        if DEPTH == 2:
            wa, wa2, wb, wb2 = wb, wb2, wc, wc2
        xa, da, nwa = xb, db, nwb


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _use_pdl(t: torch.Tensor) -> bool:
    return use_pdl(t, CONFIG["pdl"])


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4                                           # the interpreter: a few programs share the work
    return torch.cuda.get_device_properties(device).multi_processor_count


def _plan(M: int, N: int, K: int, glu: bool, device: torch.device) -> dict:
    """Tiles of a GEMV and its stream-K cut: ``ctas`` programs per SM share the iterations."""
    path = ("m1" if M == 1 else "mn") + ("_glu" if glu else "")
    cfg = dict(CONFIG[path], **CONFIG["shapes"].get(f"{path} {N}x{K}", {}))
    BM = 1 if M == 1 else _BM
    BK = cfg["BK"] = max(16, min(cfg["BK"], triton.next_power_of_2(K)))
    NI, NT = triton.cdiv(K, BK), triton.cdiv(N, cfg["BN"])
    tiles = NT * triton.cdiv(M, BM)
    iters = tiles * NI
    cfg.update(BM=BM, NI=NI, NT=NT, tiles=tiles, iters=iters)
    return cfg


_RESIDENT: dict = {}


def _resident(args, kw) -> int:
    """Programs of this kernel variant that fit on one SM at once (registers, shared memory, threads),
    read from the compiled kernel; cached per variant."""
    key = tuple(kw.items()) + tuple(a.dtype for a in args[:8])
    if key not in _RESIDENT:
        k = _gemv_kernel.warmup(*args, grid=(1,), **kw)
        k._init_handles()
        threads = 32 * kw["num_warps"]
        regs = -(-k.n_regs * 32 // 256) * 256 * kw["num_warps"]   # registers are allocated per warp, 256 at a time
        props = torch.cuda.get_device_properties(args[0].device)
        smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
        _RESIDENT[key] = max(1, min(65536 // regs, smem // (k.metadata.shared + 1024), 2048 // threads, 32))
    return _RESIDENT[key]


def lock_size(M: int, N: int, K: int, glu: bool = False, device: torch.device | str = "cuda") -> int:
    """Counters a GEMV of this shape needs (one per tile)."""
    return _plan(M, N, K, glu, torch.device(device))["tiles"]


def _gemv(x, w, b, *, d=None, norm_w=None, eps=0.0, residual=None, cap=None, cap_from=0, glu=False,
          out_dtype=None, lock=None):
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x (M, K) and w (N, K) must agree in K, got {tuple(x.shape)} and {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the decode kernels take float32, bfloat16 or float16 weights, got {w.dtype}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError("the decode kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    M, K = x.shape
    N = w.shape[0] // 2 if glu else w.shape[0]
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=out_dtype or w.dtype)
    xo = torch.empty_like(x) if d is not None else x
    p = _plan(M, N, K, glu, x.device)
    if lock is None:
        lock = torch.zeros(p["tiles"], device=x.device, dtype=torch.int32)
    elif lock.numel() < p["tiles"] or lock.dtype != torch.int32:
        raise ValueError(f"lock must be int32 zeros of at least {p['tiles']} elements")
    epi = _EPI_SWIGLU if glu else _EPI_RESIDUAL if residual is not None else _EPI_CAP if cap else _EPI_NONE
    g_max = p["tiles"] if p.get("per_tile") else min(p["iters"], p["waves"] * p["ctas"] * _num_sms(x.device))
    maxc = (p["NI"] - 1) // (p["iters"] // g_max) + 2       # most programs sharing a tile (for any G <= g_max)
    ws = torch.empty(p["tiles"] * maxc * (2 * p["BN"] * p["BM"] + p["BM"]), device=x.device, dtype=torch.float32)
    args = (x, d if d is not None else x, xo, norm_w if norm_w is not None else x, w, b if b is not None else w,
            residual.contiguous() if residual is not None else x, y, ws, lock,
            M, N, K, p["NI"], p["NT"], p["iters"], maxc, N if glu else 0, float(eps), float(cap or 1.0), int(cap_from))
    kw = dict(NORM=norm_w is not None, HAS_D=d is not None, HAS_B=b is not None, EPI=epi, BM=p["BM"], BN=p["BN"],
              BK=p["BK"], DOT=M > 1, PREC="ieee" if w.dtype == torch.float32 else "tf32", DEPTH=p["D"],
              PDL=_use_pdl(x), num_warps=p["W"], num_stages=p["S"])
    if kw["PDL"]:
        kw["launch_pdl"] = True
    # waves x (programs that fit on an SM at once) x SMs programs, all with the same work, so that
    # no wave runs part-empty
    G = g_max                                               # per_tile: each range is one whole tile
    if not p.get("per_tile") and x.is_cuda and not _interpreting():
        G = min(g_max, p["waves"] * min(p["ctas"], _resident(args, kw)) * _num_sms(x.device))
    _gemv_kernel[(G,)](*args, **kw)
    return y, xo


# ------------------------------------------------------------------------------ public GEMVs

def norm_linear(x, d, norm_w, w, b=None, *, eps: float, cap: float | None = None, cap_from: int = 0,
                out_dtype=None, lock=None):
    """x' = x + d (or x when d is None); y = rms_norm(x') W^T + b (no norm when norm_w is None),
    with cap * tanh(y / cap) on the columns from ``cap_from``. Returns (x', y). The norm has no
    bias here: fold one into b (b + W norm_bias)."""
    y, xo = _gemv(x, w, b, d=d, norm_w=norm_w, eps=eps, cap=cap, cap_from=cap_from, out_dtype=out_dtype, lock=lock)
    return xo, y


def linear(x, w, b=None, *, residual=None, lock=None):
    """x W^T + b (+ residual, added in the output dtype as ``residual + F.linear(x, w, b)``)."""
    return _gemv(x, w, b, residual=residual, lock=lock)[0]


def norm_swiglu(x, norm_w, w, b=None, *, eps: float, lock=None):
    """silu(g) * u with [g | u] = rms_norm(x) W^T + b, W (2F, K) the gate rows over the up rows."""
    if w.shape[0] % 2:
        raise ValueError(f"the gate|up weight needs an even number of rows, got {w.shape[0]}")
    return _gemv(x, w, b, norm_w=norm_w, eps=eps, glu=True, lock=lock)[0]


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
    tensors). h is rounded to y's dtype first, as the model's step returns it.
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
