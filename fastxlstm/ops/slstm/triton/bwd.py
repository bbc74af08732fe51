# sLSTM backward: the whole sequence in reverse, one launch, R split as in the forward.
# Grid: (SPLIT, H, batch tiles). Program (s, h, b) owns hidden units U = [s*BLOCK_N, (s+1)*BLOCK_N)
# and keeps R[h, U, g, :] (all four gates, as a (4, D, BLOCK_N) tile) on chip for the whole
# sequence: the rows of R whose outputs feed dh of its units. Its dc, dn, dm carries stay in
# registers. Per step t, from T-1 down to 0:
#   pointwise: recompute the gates from the saved pre-activations and c, n, m of steps t and t-1,
#     dh = dy_t + dh_rec; write dpre_t of its units (= dx) and, in R's dtype, to dbuf (slot t % 2);
#   barrier of the SPLIT programs of (head, batch tile) (fwd.group_barrier);
#   dh_rec = sum_g dpre_t[g] (all D units) @ R[h, U, g, :]^T, for step t-1 (dh_0 after step 0).
# Nothing goes through a matmul twice: the forward saved the full pre-activations and the c, n, m
# history. dR = sum_{b,t} h_{t-1}^T dpre is one large matmul outside the kernel.
# Equations: ops/slstm/native.py, pointwise_backward (the same, exact, m included).
from __future__ import annotations

import triton
import triton.language as tl

from ...mlstm.triton.fwd import _logsigmoid
from .fwd import group_barrier


@triton.jit
def slstm_bwd_kernel(
    r_ptr, pre_ptr, cs_ptr, ns_ptr, ms_ptr, dy_ptr,
    dcT_ptr, dnT_ptr, dmT_ptr, dhT_ptr,
    dpre_ptr, dc_ptr, dn_ptr, dm_ptr, dh_ptr, dbuf_ptr, cnt_ptr,
    B, T, H, D, tile0,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    FORGET_EXP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    tile = tile0 + tl.program_id(2)
    ob = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = ob < B
    oj = pid_s * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = oj < D
    ok = tl.arange(0, BLOCK_D)
    kmask = ok < D
    mask = bmask[:, None] & jmask[None, :]
    row = ob[:, None] * H + pid_h
    s_off = row * D + oj[None, :]
    cnt = cnt_ptr + tile * H + pid_h

    # R[h, j, g, k] as (g, k, j): a batched dot over the gates puts one gate on each warp (a 2D dot
    # of M 16, N 16 left each warp doing all the work); the gate sum is a reduction after it
    og = tl.arange(0, 4)
    rt_off = (pid_h * D + oj[None, None, :]) * 4 * D + og[:, None, None] * D + ok[None, :, None]
    rt = tl.load(r_ptr + rt_off, mask=kmask[None, :, None] & jmask[None, None, :], other=0.0)
    rdt = r_ptr.dtype.element_ty
    dp_off = row[None] * 4 * D + og[:, None, None] * D + ok[None, None, :]    # dbuf (2, B, H, 4, D)
    dp_mask = bmask[None, :, None] & kmask[None, None, :]

    dc = tl.load(dcT_ptr + s_off, mask=mask, other=0.0)
    dn = tl.load(dnT_ptr + s_off, mask=mask, other=0.0)
    dm = tl.load(dmT_ptr + s_off, mask=mask, other=0.0)
    dh_rec = tl.load(dhT_ptr + s_off, mask=mask, other=0.0)

    B4HD = B * H * 4 * D
    for tt in range(T):
        t = T - 1 - tt
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
        dh = tl.load(dy_ptr + y_off, mask=mask, other=0.0).to(tl.float32) + dh_rec

        so = 1.0 / (1.0 + tl.exp(-go))
        tz = 2.0 / (1.0 + tl.exp(-2.0 * gz)) - 1.0
        if FORGET_EXP:
            logf = gf
        else:
            logf = _logsigmoid(gf)
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
        di = tl.where(mask, dig + tl.where(to_i, dm_total, 0.0), 0.0)
        dlogf = dfg + tl.where(to_i, 0.0, dm_total)
        if FORGET_EXP:
            df = dlogf
        else:
            df = dlogf / (1.0 + tl.exp(gf))                               # * sigmoid(-f)
        df = tl.where(mask, df, 0.0)
        dz = tl.where(mask, dz, 0.0)
        do = tl.where(mask, do, 0.0)
        tl.store(dpre_ptr + x_off, di, mask=mask)
        tl.store(dpre_ptr + x_off + D, df, mask=mask)
        tl.store(dpre_ptr + x_off + 2 * D, dz, mask=mask)
        tl.store(dpre_ptr + x_off + 3 * D, do, mask=mask)
        slot = (t % 2) * B4HD
        b_off = row * 4 * D + oj[None, :]
        tl.store(dbuf_ptr + slot + b_off, di.to(rdt), mask=mask)
        tl.store(dbuf_ptr + slot + b_off + D, df.to(rdt), mask=mask)
        tl.store(dbuf_ptr + slot + b_off + 2 * D, dz.to(rdt), mask=mask)
        tl.store(dbuf_ptr + slot + b_off + 3 * D, do.to(rdt), mask=mask)
        dc = dc * fg
        dn = dn * fg
        dm = dlogf
        group_barrier(cnt, SPLIT * (tt + 1), SPLIT)
        # .cg: read L2, never a stale L1 line of this slot from two steps ago
        dp = tl.load(dbuf_ptr + slot + dp_off, mask=dp_mask, other=0.0, cache_modifier=".cg")   # (4, BB, D)
        dh_rec = tl.sum(tl.dot(dp, rt, input_precision=PRECISION), axis=0)
    tl.store(dc_ptr + s_off, dc, mask=mask)
    tl.store(dn_ptr + s_off, dn, mask=mask)
    tl.store(dm_ptr + s_off, dm, mask=mask)
    tl.store(dh_ptr + s_off, dh_rec, mask=mask)
