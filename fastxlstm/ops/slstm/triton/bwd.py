# sLSTM backward: the whole sequence in reverse, one launch.
# Grid: (cdiv(B, BLOCK_B), H), as the forward. One program carries, for its rows of one head,
# the running dc, dn, dm (in the d-initial-state outputs) and the recurrent gradient dh (in dh0)
# from step T-1 down to 0. Nothing goes through a matmul twice: the forward saved the full
# pre-activations and the c, n, m history, so each step
#   phase 1: per column block of BLOCK_N, recompute the pointwise gates and write dpre (= dx);
#   phase 2: per column block, dh_{t-1} = sum_g dpre_g @ R[h, :, g, :]^T over BLOCK_K slices;
# with a CTA barrier after each phase (phase 2 reads all of dpre_t; the next phase 1 reads dh).
# dR = sum_{b,t} h_{t-1}^T dpre is one large matmul outside the kernel.
# Equations: ops/slstm/native.py, pointwise_backward (the same, exact, m included).
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def slstm_bwd_kernel(
    r_ptr, pre_ptr, cs_ptr, ns_ptr, ms_ptr, dy_ptr,
    dcT_ptr, dnT_ptr, dmT_ptr, dhT_ptr,
    dpre_ptr, dc_ptr, dn_ptr, dm_ptr, dh_ptr,
    B, T, H, D,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FULL_K: tl.constexpr,
    FORGET_EXP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    ob = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = ob < B
    row = ob[:, None] * H + pid_h
    for j in range(0, D, BLOCK_N):
        oj = j + tl.arange(0, BLOCK_N)
        mask = bmask[:, None] & (oj < D)[None, :]
        s_off = row * D + oj[None, :]
        tl.store(dc_ptr + s_off, tl.load(dcT_ptr + s_off, mask=mask, other=0.0), mask=mask)
        tl.store(dn_ptr + s_off, tl.load(dnT_ptr + s_off, mask=mask, other=0.0), mask=mask)
        tl.store(dm_ptr + s_off, tl.load(dmT_ptr + s_off, mask=mask, other=0.0), mask=mask)
        tl.store(dh_ptr + s_off, tl.load(dhT_ptr + s_off, mask=mask, other=0.0), mask=mask)
    tl.debug_barrier()

    rdt = r_ptr.dtype.element_ty
    for tt in range(T):
        t = T - 1 - tt
        for j in range(0, D, BLOCK_N):
            oj = j + tl.arange(0, BLOCK_N)
            mask = bmask[:, None] & (oj < D)[None, :]
            s_off = row * D + oj[None, :]
            x_off = ((ob[:, None] * T + t) * H + pid_h) * 4 * D + oj[None, :]
            gi = tl.load(pre_ptr + x_off, mask=mask, other=0.0)
            gf = tl.load(pre_ptr + x_off + D, mask=mask, other=0.0)
            gz = tl.load(pre_ptr + x_off + 2 * D, mask=mask, other=0.0)
            go = tl.load(pre_ptr + x_off + 3 * D, mask=mask, other=0.0)
            st = ((ob[:, None] * (T + 1) + t + 1) * H + pid_h) * D + oj[None, :]
            sp = st - H * D                                                 # slot t: the previous state
            c = tl.load(cs_ptr + st, mask=mask, other=0.0)
            n = tl.load(ns_ptr + st, mask=mask, other=1.0)
            m = tl.load(ms_ptr + st, mask=mask, other=0.0)
            c_p = tl.load(cs_ptr + sp, mask=mask, other=0.0)
            n_p = tl.load(ns_ptr + sp, mask=mask, other=0.0)
            m_p = tl.load(ms_ptr + sp, mask=mask, other=0.0)
            y_off = ((ob[:, None] * T + t) * H + pid_h) * D + oj[None, :]
            dh = tl.load(dy_ptr + y_off, mask=mask, other=0.0).to(tl.float32) + \
                tl.load(dh_ptr + s_off, mask=mask, other=0.0)
            dc = tl.load(dc_ptr + s_off, mask=mask, other=0.0)
            dn = tl.load(dn_ptr + s_off, mask=mask, other=0.0)
            dm = tl.load(dm_ptr + s_off, mask=mask, other=0.0)

            so = 1.0 / (1.0 + tl.exp(-go))
            tz = 2.0 / (1.0 + tl.exp(-2.0 * gz)) - 1.0
            if FORGET_EXP:
                logf = gf
            else:
                logf = tl.minimum(gf, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(gf)))
            fexp = m_p + logf - m
            fg = tl.exp(tl.minimum(fexp, 0.0))
            ig = tl.exp(gi - m)
            inv_n = 1.0 / n
            do = dh * c * inv_n * so * (1.0 - so)
            dc = dc + dh * so * inv_n
            dn = dn - dh * so * c * inv_n * inv_n
            dz = dc * ig * (1.0 - tz * tz)
            dig = (dc * tz + dn) * ig
            dfg = tl.where(fexp <= 0.0, (dc * c_p + dn * n_p) * fg, 0.0)
            dm_total = dm - dig - dfg
            to_i = (n_p == 0.0) | (gi >= m_p + logf)
            di = dig + tl.where(to_i, dm_total, 0.0)
            dlogf = dfg + tl.where(to_i, 0.0, dm_total)
            if FORGET_EXP:
                df = dlogf
            else:
                df = dlogf / (1.0 + tl.exp(gf))                               # * sigmoid(-f)
            tl.store(dpre_ptr + x_off, tl.where(mask, di, 0.0), mask=mask)
            tl.store(dpre_ptr + x_off + D, tl.where(mask, df, 0.0), mask=mask)
            tl.store(dpre_ptr + x_off + 2 * D, tl.where(mask, dz, 0.0), mask=mask)
            tl.store(dpre_ptr + x_off + 3 * D, tl.where(mask, do, 0.0), mask=mask)
            tl.store(dc_ptr + s_off, dc * fg, mask=mask)
            tl.store(dn_ptr + s_off, dn * fg, mask=mask)
            tl.store(dm_ptr + s_off, dlogf, mask=mask)
        tl.debug_barrier()                      # dpre_t complete before phase 2 reads it

        if FULL_K:                              # all of dpre_t, loaded once: the column loop is innermost
            ok = tl.arange(0, BLOCK_K)
            dp_off = ((ob[:, None] * T + t) * H + pid_h) * 4 * D + ok[None, :]
            dp_mask = bmask[:, None] & (ok < D)[None, :]
            dp_i = tl.load(dpre_ptr + dp_off, mask=dp_mask, other=0.0).to(rdt)
            dp_f = tl.load(dpre_ptr + dp_off + D, mask=dp_mask, other=0.0).to(rdt)
            dp_z = tl.load(dpre_ptr + dp_off + 2 * D, mask=dp_mask, other=0.0).to(rdt)
            dp_o = tl.load(dpre_ptr + dp_off + 3 * D, mask=dp_mask, other=0.0).to(rdt)
        for j in range(0, D, BLOCK_N):          # columns of dh_{t-1}: R's input dimension
            oj = j + tl.arange(0, BLOCK_N)
            jmask = oj < D
            if FULL_K:
                rt_off = (pid_h * D + oj[None, :]) * 4 * D + ok[:, None]      # R[h, j, g, k] as (k, j)
                rt_mask = (ok < D)[:, None] & jmask[None, :]
                acc = tl.dot(dp_i, tl.load(r_ptr + rt_off, mask=rt_mask, other=0.0), input_precision=PRECISION)
                acc += tl.dot(dp_f, tl.load(r_ptr + rt_off + D, mask=rt_mask, other=0.0), input_precision=PRECISION)
                acc += tl.dot(dp_z, tl.load(r_ptr + rt_off + 2 * D, mask=rt_mask, other=0.0),
                              input_precision=PRECISION)
                acc += tl.dot(dp_o, tl.load(r_ptr + rt_off + 3 * D, mask=rt_mask, other=0.0),
                              input_precision=PRECISION)
            else:
                acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                for k in range(0, D, BLOCK_K):  # slices of R's output dimension
                    okk = k + tl.arange(0, BLOCK_K)
                    kmask = okk < D
                    dpk_off = ((ob[:, None] * T + t) * H + pid_h) * 4 * D + okk[None, :]
                    dpk_mask = bmask[:, None] & kmask[None, :]
                    rtk_off = (pid_h * D + oj[None, :]) * 4 * D + okk[:, None]
                    rtk_mask = kmask[:, None] & jmask[None, :]
                    for g in tl.static_range(4):
                        dp = tl.load(dpre_ptr + dpk_off + g * D, mask=dpk_mask, other=0.0).to(rdt)
                        acc += tl.dot(dp, tl.load(r_ptr + rtk_off + g * D, mask=rtk_mask, other=0.0),
                                      input_precision=PRECISION)
            tl.store(dh_ptr + row * D + oj[None, :], acc, mask=bmask[:, None] & jmask[None, :])
        tl.debug_barrier()                      # dh_{t-1} complete before the next phase 1
