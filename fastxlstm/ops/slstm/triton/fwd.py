# sLSTM forward: the whole sequence in one launch.
# Grid: (cdiv(B, BLOCK_B), H). One program owns BLOCK_B batch rows of one head and walks all T
# steps; its state c, n, m, h (BLOCK_B x BLOCK_D, float32) never leaves registers.
# Tiling: each step does four (BLOCK_B x D) @ (D x D) dots, one per gate, against the head's
# recurrent block R[h, :, g, :]; the 4*D*D block is re-read every step and stays resident in
# L1/L2 (a head's R is the only weight this program touches).
# Saved for the backward (SAVE): the full pre-activations (x + R h) and c, n, m, h of every step,
# with the initial state in slot 0, so the backward recomputes only pointwise gates, no matmul.
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def slstm_fwd_kernel(
    x_ptr, r_ptr, c0_ptr, n0_ptr, m0_ptr, h0_ptr,
    y_ptr, pre_ptr, cs_ptr, ns_ptr, ms_ptr, hs_ptr,
    cT_ptr, nT_ptr, mT_ptr, hT_ptr,
    B, T, H, D,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, FORGET_EXP: tl.constexpr, SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    ob = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    od = tl.arange(0, BLOCK_D)
    mask = (ob[:, None] < B) & (od[None, :] < D)
    s_off = (ob[:, None] * H + pid_h) * D + od[None, :]              # into (B, H, D)
    c = tl.load(c0_ptr + s_off, mask=mask, other=0.0)
    n = tl.load(n0_ptr + s_off, mask=mask, other=0.0)
    m = tl.load(m0_ptr + s_off, mask=mask, other=0.0)
    h = tl.load(h0_ptr + s_off, mask=mask, other=0.0)

    # R[h, d_in, g, d_out]: rows d_in, columns d_out, gate g at +g*D
    r_off = ((pid_h * D + od[:, None]) * 4) * D + od[None, :]
    r_mask = (od[:, None] < D) & (od[None, :] < D)
    if SAVE:
        # slot 0 of the (B, T+1, H, D) state history is the initial state
        so0 = (ob[:, None] * (T + 1) * H + pid_h) * D + od[None, :]
        tl.store(cs_ptr + so0, c, mask=mask)
        tl.store(ns_ptr + so0, n, mask=mask)
        tl.store(ms_ptr + so0, m, mask=mask)
        tl.store(hs_ptr + so0, h, mask=mask)
    for t in range(T):
        x_off = ((ob[:, None] * T + t) * H + pid_h) * 4 * D + od[None, :]
        hr = h.to(r_ptr.dtype.element_ty)
        gi = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32) + tl.dot(
            hr, tl.load(r_ptr + r_off, mask=r_mask, other=0.0), input_precision=PRECISION)
        gf = tl.load(x_ptr + x_off + D, mask=mask, other=0.0).to(tl.float32) + tl.dot(
            hr, tl.load(r_ptr + r_off + D, mask=r_mask, other=0.0), input_precision=PRECISION)
        gz = tl.load(x_ptr + x_off + 2 * D, mask=mask, other=0.0).to(tl.float32) + tl.dot(
            hr, tl.load(r_ptr + r_off + 2 * D, mask=r_mask, other=0.0), input_precision=PRECISION)
        go = tl.load(x_ptr + x_off + 3 * D, mask=mask, other=0.0).to(tl.float32) + tl.dot(
            hr, tl.load(r_ptr + r_off + 3 * D, mask=r_mask, other=0.0), input_precision=PRECISION)
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
        m = m_new
        h = tl.where(mask, c / n / (1.0 + tl.exp(-go)), 0.0)               # sigmoid(o) c / n
        y_off = ((ob[:, None] * T + t) * H + pid_h) * D + od[None, :]
        tl.store(y_ptr + y_off, h.to(y_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(pre_ptr + x_off, gi, mask=mask)
            tl.store(pre_ptr + x_off + D, gf, mask=mask)
            tl.store(pre_ptr + x_off + 2 * D, gz, mask=mask)
            tl.store(pre_ptr + x_off + 3 * D, go, mask=mask)
            st_off = ((ob[:, None] * (T + 1) + t + 1) * H + pid_h) * D + od[None, :]
            tl.store(cs_ptr + st_off, c, mask=mask)
            tl.store(ns_ptr + st_off, n, mask=mask)
            tl.store(ms_ptr + st_off, m, mask=mask)
            tl.store(hs_ptr + st_off, h, mask=mask)
    tl.store(cT_ptr + s_off, c, mask=mask)
    tl.store(nT_ptr + s_off, n, mask=mask)
    tl.store(mT_ptr + s_off, m, mask=mask)
    tl.store(hT_ptr + s_off, h, mask=mask)
