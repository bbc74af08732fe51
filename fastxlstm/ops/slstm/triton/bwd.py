# sLSTM backward: the whole sequence in reverse, one launch.
# Grid: (cdiv(B, BLOCK_B), H), as the forward. One program carries dc, dn, dm and the recurrent
# gradient dh (BLOCK_B x BLOCK_D, float32) from step T-1 down to 0.
# Nothing is recomputed through a matmul: the forward saved the full pre-activations and the
# c, n, m history, so each step recomputes only the pointwise gates, writes the pre-activation
# gradient dpre (which is also dx), and forms the next dh with four (BLOCK_B x D) @ (D x D) dots
# against R[h, :, g, :] read transposed. dR = sum_{b,t} h_{t-1}^T dpre is one large matmul
# outside the kernel. Equations: ops/slstm/native.py, pointwise_backward (the same, exact).
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def slstm_bwd_kernel(
    r_ptr, pre_ptr, cs_ptr, ns_ptr, ms_ptr, dy_ptr,
    dcT_ptr, dnT_ptr, dmT_ptr, dhT_ptr,
    dpre_ptr, dc0_ptr, dn0_ptr, dm0_ptr, dh0_ptr,
    B, T, H, D,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, FORGET_EXP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    ob = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    od = tl.arange(0, BLOCK_D)
    mask = (ob[:, None] < B) & (od[None, :] < D)
    s_off = (ob[:, None] * H + pid_h) * D + od[None, :]
    dc = tl.load(dcT_ptr + s_off, mask=mask, other=0.0)
    dn = tl.load(dnT_ptr + s_off, mask=mask, other=0.0)
    dm = tl.load(dmT_ptr + s_off, mask=mask, other=0.0)
    dh_rec = tl.load(dhT_ptr + s_off, mask=mask, other=0.0)

    # R transposed: rows d_out (e), columns d_in (d): R[h, d, g, e]
    rt_off = ((pid_h * D + od[None, :]) * 4) * D + od[:, None]
    r_mask = (od[:, None] < D) & (od[None, :] < D)
    for tt in range(T):
        t = T - 1 - tt
        x_off = ((ob[:, None] * T + t) * H + pid_h) * 4 * D + od[None, :]
        gi = tl.load(pre_ptr + x_off, mask=mask, other=0.0)
        gf = tl.load(pre_ptr + x_off + D, mask=mask, other=0.0)
        gz = tl.load(pre_ptr + x_off + 2 * D, mask=mask, other=0.0)
        go = tl.load(pre_ptr + x_off + 3 * D, mask=mask, other=0.0)
        st = ((ob[:, None] * (T + 1) + t + 1) * H + pid_h) * D + od[None, :]
        sp = st - H * D                                                     # slot t: the previous state
        c = tl.load(cs_ptr + st, mask=mask, other=0.0)
        n = tl.load(ns_ptr + st, mask=mask, other=1.0)
        m = tl.load(ms_ptr + st, mask=mask, other=0.0)
        c_p = tl.load(cs_ptr + sp, mask=mask, other=0.0)
        n_p = tl.load(ns_ptr + sp, mask=mask, other=0.0)
        m_p = tl.load(ms_ptr + sp, mask=mask, other=0.0)
        y_off = ((ob[:, None] * T + t) * H + pid_h) * D + od[None, :]
        dh = tl.load(dy_ptr + y_off, mask=mask, other=0.0).to(tl.float32) + dh_rec

        so = 1.0 / (1.0 + tl.exp(-go))
        tz = 2.0 / (1.0 + tl.exp(-2.0 * gz)) - 1.0
        sig_f = 1.0 / (1.0 + tl.exp(-gf))
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
            df = dlogf * (1.0 - sig_f)
        di = tl.where(mask, di, 0.0)
        df = tl.where(mask, df, 0.0)
        dz = tl.where(mask, dz, 0.0)
        do = tl.where(mask, do, 0.0)
        tl.store(dpre_ptr + x_off, di, mask=mask)
        tl.store(dpre_ptr + x_off + D, df, mask=mask)
        tl.store(dpre_ptr + x_off + 2 * D, dz, mask=mask)
        tl.store(dpre_ptr + x_off + 3 * D, do, mask=mask)
        dc = dc * fg
        dn = dn * fg
        dm = dlogf
        rdt = r_ptr.dtype.element_ty
        dh_rec = tl.dot(di.to(rdt), tl.load(r_ptr + rt_off, mask=r_mask, other=0.0), input_precision=PRECISION)
        dh_rec += tl.dot(df.to(rdt), tl.load(r_ptr + rt_off + D, mask=r_mask, other=0.0), input_precision=PRECISION)
        dh_rec += tl.dot(dz.to(rdt), tl.load(r_ptr + rt_off + 2 * D, mask=r_mask, other=0.0), input_precision=PRECISION)
        dh_rec += tl.dot(do.to(rdt), tl.load(r_ptr + rt_off + 3 * D, mask=r_mask, other=0.0), input_precision=PRECISION)
    tl.store(dc0_ptr + s_off, dc, mask=mask)
    tl.store(dn0_ptr + s_off, dn, mask=mask)
    tl.store(dm0_ptr + s_off, dm, mask=mask)
    tl.store(dh0_ptr + s_off, dh_rec, mask=mask)
