# sLSTM forward: the whole sequence in one launch, each head's R split over SPLIT programs.
# Grid: (SPLIT, H, batch tiles). Program (s, h, b) owns hidden units [s*BLOCK_N, (s+1)*BLOCK_N)
# of head h for BLOCK_B batch rows: it loads the slice R[h, :, g, units] of all four gates once
# (D x 4*BLOCK_N) and keeps it on chip for the whole sequence, so the pointwise update of its
# units is local and c, n, m stay in registers. Per step:
#   pre_g = x_g + h_{t-1} @ R[h, :, g, units]   (tl.dot, float32 accumulation, operands in R's dtype)
#   pointwise cell update; h_t of its units -> hbuf (ping-pong slot t % 2, float32);
#   barrier of the SPLIT programs of (head, batch tile); then all of h_t <- hbuf for the next step.
# Why split: a head's R (512 KiB in bf16 at D 256) exceeds one SM's shared memory; one program
# per head re-streamed it from L2 every step (35 us/step). Split 16 ways it is 32 KiB per program.
# The barrier is a counter per (head, batch tile) in global memory: each program adds 1 after its
# stores (release) and spins until the counter reaches SPLIT * (t + 1) (acquire). That needs all
# programs of the grid resident at once: the launcher keeps the grid <= the number of SMs. SPLIT 1
# needs no barrier (a CTA barrier orders the hbuf exchange): the interpreter runs that path.
# Two slots suffice: a program writes slot t % 2 at step t only after the barrier of step t-1,
# which every program passes only after it has read h_{t-2} from that slot.
# h_{t-1} enters the dot as two operands in R's dtype, hi = rnd(h) and lo = rnd(h - hi) (HILO, when
# R is not float32): rounding h once (2^-9 relative in bf16) moves each pre-activation by ~1e-3,
# which flips the stabiliser's max(i, m + log f) wherever the two are that close, and the gradient
# the backward then routes through m (to i or to f) is the other branch's: dx, dR outliers of
# O(dm) (rel max-abs 0.3 in bf16 at B 16, T 512) for any loss that is not stabiliser invariant.
# hi + lo carries ~16 bits of h: the pre-activations match float32 math on the rounded x, R.
# hbuf holds h in float32 for the split.
# Saved for the backward (SAVE): the full pre-activations (x + R h) and c, n, m, h of every step,
# with the initial state in slot 0, so the backward recomputes only pointwise gates, no matmul.
from __future__ import annotations

import triton
import triton.language as tl

from ...mlstm.triton.fwd import _logsigmoid


@triton.jit
def group_barrier(cnt_ptr, target, SPLIT: tl.constexpr):
    """All SPLIT programs of a group have arrived (target = SPLIT * steps done): their global
    stores before the call are visible to every thread of the caller after it."""
    if SPLIT > 1:
        tl.debug_barrier()                      # every thread's stores issued before the release
        tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()                          # the acquire (one thread) covers the whole CTA


@triton.jit
def slstm_fwd_kernel(
    x_ptr, r_ptr, c0_ptr, n0_ptr, m0_ptr, h0_ptr,
    y_ptr, pre_ptr, cs_ptr, ns_ptr, ms_ptr, hs_ptr,
    c_ptr, n_ptr, m_ptr, hT_ptr, hbuf_ptr, cnt_ptr,
    B, T, H, D, tile0,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    FORGET_EXP: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr, HILO: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    tile = tile0 + tl.program_id(2)
    ob = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = ob < B
    oj = pid_s * BLOCK_N + tl.arange(0, BLOCK_N)                        # this program's units
    jmask = oj < D
    ok = tl.arange(0, BLOCK_D)                                          # all units of the head
    kmask = ok < D
    mask = bmask[:, None] & jmask[None, :]
    hk_mask = bmask[:, None] & kmask[None, :]
    row = ob[:, None] * H + pid_h                                       # (BLOCK_B, 1) into (B, H)
    s_off = row * D + oj[None, :]
    hk_off = row * D + ok[None, :]
    cnt = cnt_ptr + tile * H + pid_h

    # the slice as one (D, 4*BLOCK_N) tile, column 4*j + g: one dot per step spreads its columns
    # over the warps (four (D, BLOCK_N) dots of M 16 left each warp doing all the work)
    oc = tl.arange(0, 4 * BLOCK_N)
    cj = pid_s * BLOCK_N + oc // 4
    r_off = ((pid_h * D + ok[:, None]) * 4 + oc[None, :] % 4) * D + cj[None, :]
    r = tl.load(r_ptr + r_off, mask=kmask[:, None] & (cj < D)[None, :], other=0.0)
    rdt = r_ptr.dtype.element_ty

    c = tl.load(c0_ptr + s_off, mask=mask, other=0.0)
    n = tl.load(n0_ptr + s_off, mask=mask, other=0.0)
    m = tl.load(m0_ptr + s_off, mask=mask, other=0.0)
    h = tl.load(h0_ptr + s_off, mask=mask, other=0.0)
    h_prev = tl.load(h0_ptr + hk_off, mask=hk_mask, other=0.0)
    if SAVE:
        hist = (ob[:, None] * (T + 1) * H + pid_h) * D + oj[None, :]   # slot 0
        tl.store(cs_ptr + hist, c, mask=mask)
        tl.store(ns_ptr + hist, n, mask=mask)
        tl.store(ms_ptr + hist, m, mask=mask)
        tl.store(hs_ptr + hist, h, mask=mask)

    BHD = B * H * D
    for t in range(T):
        x_off = ((ob[:, None] * T + t) * H + pid_h) * 4 * D + oj[None, :]
        gi = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        gf = tl.load(x_ptr + x_off + D, mask=mask, other=0.0).to(tl.float32)
        gz = tl.load(x_ptr + x_off + 2 * D, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(x_ptr + x_off + 3 * D, mask=mask, other=0.0).to(tl.float32)
        h_hi = h_prev.to(rdt)
        acc = tl.dot(h_hi, r, input_precision=PRECISION)
        if HILO:                                                        # + rnd(h - hi) @ R: see above
            acc = tl.dot((h_prev - h_hi.to(tl.float32)).to(rdt), r, acc=acc, input_precision=PRECISION)
        acc = tl.reshape(acc, (BLOCK_B, BLOCK_N, 2, 2))
        acc_iz, acc_fo = tl.split(acc)                                  # gate 2 * g1 + g0: split g0, then g1
        acc_i, acc_z = tl.split(acc_iz)
        acc_f, acc_o = tl.split(acc_fo)
        gi += acc_i
        gf += acc_f
        gz += acc_z
        go += acc_o
        if FORGET_EXP:
            logf = gf
        else:
            logf = _logsigmoid(gf)
        m_new = tl.where(n == 0.0, gi, tl.maximum(gi, m + logf))
        ig = tl.exp(gi - m_new)
        fg = tl.exp(tl.minimum(m + logf - m_new, 0.0))
        tz = 2.0 / (1.0 + tl.exp(-2.0 * gz)) - 1.0                         # tanh
        c = fg * c + ig * tz
        n = fg * n + ig
        m = m_new
        h = tl.where(mask, c / n / (1.0 + tl.exp(-go)), 0.0)               # sigmoid(o) c / n
        slot = (t % 2) * BHD
        tl.store(hbuf_ptr + slot + s_off, h, mask=mask)                 # float32
        y_off = ((ob[:, None] * T + t) * H + pid_h) * D + oj[None, :]
        tl.store(y_ptr + y_off, h.to(y_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(pre_ptr + x_off, gi, mask=mask)
            tl.store(pre_ptr + x_off + D, gf, mask=mask)
            tl.store(pre_ptr + x_off + 2 * D, gz, mask=mask)
            tl.store(pre_ptr + x_off + 3 * D, go, mask=mask)
            hist = ((ob[:, None] * (T + 1) + t + 1) * H + pid_h) * D + oj[None, :]
            tl.store(cs_ptr + hist, c, mask=mask)
            tl.store(ns_ptr + hist, n, mask=mask)
            tl.store(ms_ptr + hist, m, mask=mask)
            tl.store(hs_ptr + hist, h, mask=mask)
        group_barrier(cnt, SPLIT * (t + 1), SPLIT)
        # .cg: read L2, never a stale L1 line of this slot from two steps ago
        h_prev = tl.load(hbuf_ptr + slot + hk_off, mask=hk_mask, other=0.0, cache_modifier=".cg")
    tl.store(c_ptr + s_off, c, mask=mask)
    tl.store(n_ptr + s_off, n, mask=mask)
    tl.store(m_ptr + s_off, m, mask=mask)
    tl.store(hT_ptr + s_off, h, mask=mask)
