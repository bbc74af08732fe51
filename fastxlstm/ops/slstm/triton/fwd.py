# sLSTM forward: the whole sequence in one launch.
# Grid: (cdiv(B, BLOCK_B), H). One program owns BLOCK_B batch rows of one head and walks all T
# steps. Per step it sweeps the head's D outputs in column blocks of BLOCK_N: for each block the
# four gate pre-activations are x + h_{t-1} @ R[h, :, g, block], summed over BLOCK_K slices of
# h_{t-1} (tl.dot, float32 accumulation), then the pointwise update of that block. FULL_K (BLOCK_K
# >= D) takes h_{t-1} in one slice, so the column loop is innermost and software-pipelined.
# Why column blocks instead of one D x 4D tile: a head's R is 4*D*D (512 KiB in bf16 at D=256),
# more than a multiprocessor's shared memory, so it streams per step from L2, where it stays
# resident (each program touches only its head's R).
# h_{t-1} lives in a ping-pong buffer in global memory (hbuf, L1/L2 resident): every column
# block reads all of h_{t-1} while writing its part of h_t; a CTA barrier ends each step. The
# running c, n, m live in the final-state outputs; each column block owns its columns.
# Saved for the backward (SAVE): the full pre-activations (x + R h) and c, n, m, h of every step,
# with the initial state in slot 0, so the backward recomputes only pointwise gates, no matmul.
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def slstm_fwd_kernel(
    x_ptr, r_ptr, c0_ptr, n0_ptr, m0_ptr, h0_ptr,
    y_ptr, pre_ptr, cs_ptr, ns_ptr, ms_ptr, hs_ptr,
    c_ptr, n_ptr, m_ptr, hbuf_ptr,
    B, T, H, D,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FULL_K: tl.constexpr,
    FORGET_EXP: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    ob = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = ob < B
    row = ob[:, None] * H + pid_h                                       # (BLOCK_B, 1) into (B, H)
    for j in range(0, D, BLOCK_N):
        oj = j + tl.arange(0, BLOCK_N)
        mask = bmask[:, None] & (oj < D)[None, :]
        s_off = row * D + oj[None, :]
        c = tl.load(c0_ptr + s_off, mask=mask, other=0.0)
        n = tl.load(n0_ptr + s_off, mask=mask, other=0.0)
        m = tl.load(m0_ptr + s_off, mask=mask, other=0.0)
        h = tl.load(h0_ptr + s_off, mask=mask, other=0.0)
        tl.store(c_ptr + s_off, c, mask=mask)
        tl.store(n_ptr + s_off, n, mask=mask)
        tl.store(m_ptr + s_off, m, mask=mask)
        tl.store(hbuf_ptr + s_off, h, mask=mask)
        if SAVE:
            hist = (ob[:, None] * (T + 1) * H + pid_h) * D + oj[None, :]   # slot 0
            tl.store(cs_ptr + hist, c, mask=mask)
            tl.store(ns_ptr + hist, n, mask=mask)
            tl.store(ms_ptr + hist, m, mask=mask)
            tl.store(hs_ptr + hist, h, mask=mask)
    tl.debug_barrier()

    rdt = r_ptr.dtype.element_ty
    BHD = B * H * D
    for t in range(T):
        src = (t % 2) * BHD
        dst = BHD - src
        if FULL_K:                              # all of h_{t-1} in one slice, loaded once per step
            ok = tl.arange(0, BLOCK_K)
            h_all = tl.load(hbuf_ptr + src + row * D + ok[None, :], mask=bmask[:, None] & (ok < D)[None, :],
                            other=0.0).to(rdt)
        for j in range(0, D, BLOCK_N):          # with FULL_K the innermost loop: Triton prefetches R tiles
            oj = j + tl.arange(0, BLOCK_N)
            jmask = oj < D
            mask = bmask[:, None] & jmask[None, :]
            if FULL_K:
                r_off = (pid_h * D + ok[:, None]) * 4 * D + oj[None, :]      # R[h, k, g, j] at + g*D
                r_mask = (ok < D)[:, None] & jmask[None, :]
                acc_i = tl.dot(h_all, tl.load(r_ptr + r_off, mask=r_mask, other=0.0), input_precision=PRECISION)
                acc_f = tl.dot(h_all, tl.load(r_ptr + r_off + D, mask=r_mask, other=0.0), input_precision=PRECISION)
                acc_z = tl.dot(h_all, tl.load(r_ptr + r_off + 2 * D, mask=r_mask, other=0.0),
                               input_precision=PRECISION)
                acc_o = tl.dot(h_all, tl.load(r_ptr + r_off + 3 * D, mask=r_mask, other=0.0),
                               input_precision=PRECISION)
            else:
                acc_i = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                acc_f = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                acc_z = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                acc_o = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                for k in range(0, D, BLOCK_K):
                    okk = k + tl.arange(0, BLOCK_K)
                    kmask = okk < D
                    hk = tl.load(hbuf_ptr + src + row * D + okk[None, :], mask=bmask[:, None] & kmask[None, :],
                                 other=0.0).to(rdt)
                    r_off = (pid_h * D + okk[:, None]) * 4 * D + oj[None, :]
                    r_mask = kmask[:, None] & jmask[None, :]
                    acc_i += tl.dot(hk, tl.load(r_ptr + r_off, mask=r_mask, other=0.0), input_precision=PRECISION)
                    acc_f += tl.dot(hk, tl.load(r_ptr + r_off + D, mask=r_mask, other=0.0),
                                    input_precision=PRECISION)
                    acc_z += tl.dot(hk, tl.load(r_ptr + r_off + 2 * D, mask=r_mask, other=0.0),
                                    input_precision=PRECISION)
                    acc_o += tl.dot(hk, tl.load(r_ptr + r_off + 3 * D, mask=r_mask, other=0.0),
                                    input_precision=PRECISION)
            x_off = ((ob[:, None] * T + t) * H + pid_h) * 4 * D + oj[None, :]
            gi = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32) + acc_i
            gf = tl.load(x_ptr + x_off + D, mask=mask, other=0.0).to(tl.float32) + acc_f
            gz = tl.load(x_ptr + x_off + 2 * D, mask=mask, other=0.0).to(tl.float32) + acc_z
            go = tl.load(x_ptr + x_off + 3 * D, mask=mask, other=0.0).to(tl.float32) + acc_o
            s_off = row * D + oj[None, :]
            c = tl.load(c_ptr + s_off, mask=mask, other=0.0)
            n = tl.load(n_ptr + s_off, mask=mask, other=0.0)
            m = tl.load(m_ptr + s_off, mask=mask, other=0.0)
            if FORGET_EXP:
                logf = gf
            else:
                logf = tl.minimum(gf, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(gf)))   # stable logsigmoid
            m_new = tl.where(n == 0.0, gi, tl.maximum(gi, m + logf))
            ig = tl.exp(gi - m_new)
            fg = tl.exp(tl.minimum(m + logf - m_new, 0.0))
            tz = 2.0 / (1.0 + tl.exp(-2.0 * gz)) - 1.0                         # tanh
            c = fg * c + ig * tz
            n = fg * n + ig
            h = tl.where(mask, c / n / (1.0 + tl.exp(-go)), 0.0)               # sigmoid(o) c / n
            tl.store(c_ptr + s_off, c, mask=mask)
            tl.store(n_ptr + s_off, n, mask=mask)
            tl.store(m_ptr + s_off, m_new, mask=mask)
            tl.store(hbuf_ptr + dst + s_off, h, mask=mask)
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
                tl.store(ms_ptr + hist, m_new, mask=mask)
                tl.store(hs_ptr + hist, h, mask=mask)
        tl.debug_barrier()                      # h_t complete before any block of step t+1 reads it
