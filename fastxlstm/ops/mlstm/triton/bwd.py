"""Chunkwise mLSTM backward: exact gradients, normaliser paths included.

The cell is linear attention with an extra value column of ones (n is that column of C), read
out as h = o[:Dv] / (max(|o[Dv]|, exp(-m)) + eps). So with do = dh / den and
ds = -(dh . h) / den * sign(s) * [|s| > exp(-m)], the backward is a gated linear-attention
backward with dO' = [do, ds] and V' = [v, 1]. Gate gradients come from per-token dot products
(q . dq and k . dk sum the gradients of all log weights a token appears in) plus the path through
the stabiliser m, whose partial is -eps / den * (dh . h); both are assembled in __init__.py.
Nothing is recomputed from scratch: the forward saved the chunk-start states, the per-chunk and
per-token gate scalars and s; the backward re-reads q, k, v and recomputes the L x L gate weights
and score blocks.

_prep_kernel       grid (cdiv(T_all, BT), H): per token 1/den, ds and the stabiliser partial g.
_state_kernel      grid (cdiv(Dqk, BK), cdiv(Dv, BV), N_seq * H): the reverse chunk recurrence
                   dC_start = exp(g + m_start - m_end) dC_end + (q~ * w0)^T dO (dn likewise with
                   ds); stores dC at every chunk end and the gradient of the initial state.
_dqk_kernel        grid (cdiv(Dqk, BK), N_chunks * L / BT, H): dq and dk for BT rows and a BK
                   slice; dP = dO V^T + ds is rebuilt from Dv tiles; the diagonal block is shared
                   by dq and dk. Also stores q . dq and k . dk partial sums per BK slice.
_dv_kernel         grid (cdiv(Dv, BV), N_chunks * L / BT, H): dv = sum_t (S * W)^T dO + w_end K dC_end.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _prep_kernel(dh_ptr, h_ptr, tok_ptr, scal_ptr, eps, T_all, H: tl.constexpr, V: tl.constexpr,
                 BT: tl.constexpr, BV: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    r = pid_t.to(tl.int64) * BT + tl.arange(0, BT)
    vr = r < T_all
    dhh = tl.zeros([BT], dtype=tl.float32)
    for vv in range(0, V, BV):
        ov = vv + tl.arange(0, BV)
        msk = vr[:, None] & (ov < V)[None, :]
        off = r[:, None] * (H * V) + h * V + ov[None, :]
        dhh += tl.sum(tl.load(dh_ptr + off, mask=msk, other=0.0).to(tl.float32)
                      * tl.load(h_ptr + off, mask=msk, other=0.0).to(tl.float32), 1)
    m = tl.load(tok_ptr + (H + h) * T_all + r, mask=vr, other=0.0)
    s = tl.load(tok_ptr + (2 * H + h) * T_all + r, mask=vr, other=0.0)
    floor = tl.exp(-m)
    inv_den = 1.0 / (tl.maximum(tl.abs(s), floor) + eps)
    sgn = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
    ds = tl.where(tl.abs(s) > floor, -dhh * inv_den * sgn, 0.0)
    tl.store(scal_ptr + h * T_all + r, inv_den, mask=vr)
    tl.store(scal_ptr + (H + h) * T_all + r, ds, mask=vr)
    tl.store(scal_ptr + (2 * H + h) * T_all + r, -eps * dhh * inv_den, mask=vr)


@triton.jit
def _state_kernel(
    q_ptr, dh_ptr, tok_ptr, scal_ptr, chs_ptr, cu_ptr, first_ptr, dct_ptr, dnt_ptr,
    dcs_ptr, dns_ptr, dc0_ptr, dn0_ptr,
    scale, T_all, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid = tl.program_id(2)
    seq = pid // H
    h = pid % H
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    first = tl.load(first_ptr + seq).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, L)
    ok = pid_k * BK + tl.arange(0, BK)
    ov = pid_v * BV + tl.arange(0, BV)
    mk = ok < K
    mv = ov < V
    mkv = mk[:, None] & mv[None, :]
    ot = tl.arange(0, L)
    state_off = (seq * H + h).to(tl.int64)
    dc = tl.load(dct_ptr + state_off * K * V + ok[:, None] * V + ov[None, :], mask=mkv, other=0.0).to(tl.float32)
    dn = tl.load(dnt_ptr + state_off * K + ok, mask=mk, other=0.0).to(tl.float32)
    for jj in range(0, n_chunks):
        j = n_chunks - 1 - jj
        gc = first + j
        cst = (gc * H + h) * K
        tl.store(dcs_ptr + cst * V + ok[:, None] * V + ov[None, :], dc.to(dcs_ptr.dtype.element_ty), mask=mkv)
        if pid_v == 0:
            tl.store(dns_ptr + cst + ok, dn, mask=mk)
        t = bos + j * L + ot
        valid = t < eos
        b_r = tl.load(tok_ptr + h * T_all + t, mask=valid, other=0.0)
        m_r = tl.load(tok_ptr + (H + h) * T_all + t, mask=valid, other=0.0)
        inv_den = tl.load(scal_ptr + h * T_all + t, mask=valid, other=0.0)
        ds = tl.load(scal_ptr + (H + h) * T_all + t, mask=valid, other=0.0)
        m_prev = tl.load(chs_ptr + (gc * H + h) * 3)
        g = tl.load(chs_ptr + (gc * H + h) * 3 + 1)
        m_end = tl.load(chs_ptr + (gc * H + h) * 3 + 2)
        w0 = tl.where(valid, tl.exp(b_r + m_prev - m_r), 0.0) * scale
        qt = tl.load(q_ptr + t[:, None] * (H * K) + h * K + ok[None, :], mask=valid[:, None] & mk[None, :], other=0.0)
        do = tl.load(dh_ptr + t[:, None] * (H * V) + h * V + ov[None, :], mask=valid[:, None] & mv[None, :], other=0.0)
        do = (do.to(tl.float32) * inv_den[:, None]).to(qt.dtype)
        qw = qt.to(tl.float32) * w0[:, None]
        decay = tl.exp(g + m_prev - m_end)
        dc = dc * decay + tl.dot(tl.trans(qw.to(qt.dtype)), do)
        dn = dn * decay + tl.sum(qw * ds[:, None], 0)
    tl.store(dc0_ptr + state_off * K * V + ok[:, None] * V + ov[None, :], dc, mask=mkv)
    if pid_v == 0:
        tl.store(dn0_ptr + state_off * K + ok, dn, mask=mk)


@triton.jit
def _dqk_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, dh_ptr, cs_ptr, ns_ptr, dcs_ptr, dns_ptr, chs_ptr, tok_ptr, scal_ptr,
    start_ptr, end_ptr, dq_ptr, dk_ptr, part_ptr,
    scale, T_all, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    h = tl.program_id(2)
    NSUB: tl.constexpr = L // BT
    gc = (pid_c // NSUB).to(tl.int64)
    sub = pid_c % NSUB
    t0 = tl.load(start_ptr + gc)
    te = tl.load(end_ptr + gc)
    r0 = t0 + sub * BT
    if r0 < te:
        ob = tl.arange(0, BT)
        r = r0 + ob
        vr = r < te
        ok = pid_k * BK + tl.arange(0, BK)
        mk = ok < K
        b_r = tl.load(tok_ptr + h * T_all + r, mask=vr, other=0.0)
        m_r = tl.load(tok_ptr + (H + h) * T_all + r, mask=vr, other=0.0)
        i_r = tl.load(i_ptr + r * H + h, mask=vr, other=0.0).to(tl.float32)
        inv_r = tl.load(scal_ptr + h * T_all + r, mask=vr, other=0.0)
        ds_r = tl.load(scal_ptr + (H + h) * T_all + r, mask=vr, other=0.0)
        m_prev = tl.load(chs_ptr + (gc * H + h) * 3)
        g = tl.load(chs_ptr + (gc * H + h) * 3 + 1)
        m_end = tl.load(chs_ptr + (gc * H + h) * 3 + 2)
        cst = (gc * H + h) * K
        qk_off = r[:, None] * (H * K) + h * K + ok[None, :]
        qk_msk = vr[:, None] & mk[None, :]
        q_r = tl.load(q_ptr + qk_off, mask=qk_msk, other=0.0)
        k_r = tl.load(k_ptr + qk_off, mask=qk_msk, other=0.0)

        # inter-chunk terms: dO C_start^T (for dq) and V dC_end^T (for dk), over Dv tiles
        dq = tl.zeros([BT, BK], dtype=tl.float32)
        dk = tl.zeros([BT, BK], dtype=tl.float32)
        dp_diag = tl.zeros([BT, BT], dtype=tl.float32)
        for vv in range(0, V, BV):
            ov = vv + tl.arange(0, BV)
            mv = ov < V
            v_off = r[:, None] * (H * V) + h * V + ov[None, :]
            v_msk = vr[:, None] & mv[None, :]
            do = (tl.load(dh_ptr + v_off, mask=v_msk, other=0.0).to(tl.float32) * inv_r[:, None]).to(q_r.dtype)
            vt = tl.load(v_ptr + v_off, mask=v_msk, other=0.0)
            cp = tl.load(cs_ptr + cst * V + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            dce = tl.load(dcs_ptr + cst * V + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            dq += tl.dot(do, tl.trans(cp.to(q_r.dtype)))
            dk += tl.dot(vt, tl.trans(dce.to(q_r.dtype)))
            dp_diag += tl.dot(do, tl.trans(vt))
        n_p = tl.load(ns_ptr + cst + ok, mask=mk, other=0.0)
        dn_e = tl.load(dns_ptr + cst + ok, mask=mk, other=0.0)
        w0 = tl.where(vr, tl.exp(b_r + m_prev - m_r), 0.0)
        w_end = tl.where(vr, tl.exp(g - b_r + i_r - m_end), 0.0)
        dq = (dq + ds_r[:, None] * n_p[None, :]) * w0[:, None]
        dk = (dk + dn_e[None, :]) * w_end[:, None]

        # diagonal block, shared by dq and dk
        causal = (ob[None, :] <= ob[:, None]) & vr[None, :] & vr[:, None]
        w = tl.where(causal, tl.exp(b_r[:, None] - b_r[None, :] + i_r[None, :] - m_r[:, None]), 0.0)
        dpw = ((dp_diag + ds_r[:, None]) * w).to(q_r.dtype)
        dq += tl.dot(dpw, k_r)
        dk += tl.dot(tl.trans(dpw), q_r) * scale

        # earlier key blocks of the chunk -> dq
        for jb in range(0, sub):
            c0 = t0 + jb * BT + ob
            b_c = tl.load(tok_ptr + h * T_all + c0)
            i_c = tl.load(i_ptr + c0 * H + h).to(tl.float32)
            dp = tl.zeros([BT, BT], dtype=tl.float32)
            for vv in range(0, V, BV):
                ov = vv + tl.arange(0, BV)
                mv = ov < V
                do = (tl.load(dh_ptr + r[:, None] * (H * V) + h * V + ov[None, :], mask=vr[:, None] & mv[None, :],
                              other=0.0).to(tl.float32) * inv_r[:, None]).to(q_r.dtype)
                vt = tl.load(v_ptr + c0[:, None] * (H * V) + h * V + ov[None, :], mask=mv[None, :], other=0.0)
                dp += tl.dot(do, tl.trans(vt))
            w = tl.where(vr[:, None], tl.exp(b_r[:, None] - b_c[None, :] + i_c[None, :] - m_r[:, None]), 0.0)
            kt = tl.load(k_ptr + c0[:, None] * (H * K) + h * K + ok[None, :], mask=mk[None, :], other=0.0)
            dq += tl.dot(((dp + ds_r[:, None]) * w).to(q_r.dtype), kt)

        # later query blocks of the chunk -> dk
        for tb in range(sub + 1, NSUB):
            c0 = t0 + tb * BT + ob
            vc = c0 < te
            b_c = tl.load(tok_ptr + h * T_all + c0, mask=vc, other=0.0)
            m_c = tl.load(tok_ptr + (H + h) * T_all + c0, mask=vc, other=0.0)
            inv_c = tl.load(scal_ptr + h * T_all + c0, mask=vc, other=0.0)
            ds_c = tl.load(scal_ptr + (H + h) * T_all + c0, mask=vc, other=0.0)
            dp = tl.zeros([BT, BT], dtype=tl.float32)
            for vv in range(0, V, BV):
                ov = vv + tl.arange(0, BV)
                mv = ov < V
                do = (tl.load(dh_ptr + c0[:, None] * (H * V) + h * V + ov[None, :], mask=vc[:, None] & mv[None, :],
                              other=0.0).to(tl.float32) * inv_c[:, None]).to(q_r.dtype)
                vt = tl.load(v_ptr + r[:, None] * (H * V) + h * V + ov[None, :], mask=vr[:, None] & mv[None, :], other=0.0)
                dp += tl.dot(do, tl.trans(vt))
            w = tl.where(vc[:, None] & vr[None, :],
                         tl.exp(b_c[:, None] - b_r[None, :] + i_r[None, :] - m_c[:, None]), 0.0)
            qt = tl.load(q_ptr + c0[:, None] * (H * K) + h * K + ok[None, :], mask=vc[:, None] & mk[None, :], other=0.0)
            dk += tl.dot(tl.trans(((dp + ds_c[:, None]) * w * scale).to(q_r.dtype)), qt)

        dq = dq * scale
        tl.store(dq_ptr + qk_off, dq.to(dq_ptr.dtype.element_ty), mask=qk_msk)
        tl.store(dk_ptr + qk_off, dk.to(dk_ptr.dtype.element_ty), mask=qk_msk)
        NKT = tl.num_programs(0)
        tl.store(part_ptr + ((0 * NKT + pid_k) * H + h) * T_all + r, tl.sum(q_r.to(tl.float32) * dq, 1), mask=vr)
        tl.store(part_ptr + ((1 * NKT + pid_k) * H + h) * T_all + r, tl.sum(k_r.to(tl.float32) * dk, 1), mask=vr)


@triton.jit
def _dv_kernel(
    q_ptr, k_ptr, i_ptr, dh_ptr, dcs_ptr, chs_ptr, tok_ptr, scal_ptr, start_ptr, end_ptr, dv_ptr,
    scale, T_all, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_c = tl.program_id(1)
    h = tl.program_id(2)
    NSUB: tl.constexpr = L // BT
    gc = (pid_c // NSUB).to(tl.int64)
    sub = pid_c % NSUB
    t0 = tl.load(start_ptr + gc)
    te = tl.load(end_ptr + gc)
    r0 = t0 + sub * BT
    if r0 < te:
        ob = tl.arange(0, BT)
        r = r0 + ob
        vr = r < te
        ov = pid_v * BV + tl.arange(0, BV)
        mv = ov < V
        b_r = tl.load(tok_ptr + h * T_all + r, mask=vr, other=0.0)
        i_r = tl.load(i_ptr + r * H + h, mask=vr, other=0.0).to(tl.float32)
        g = tl.load(chs_ptr + (gc * H + h) * 3 + 1)
        m_end = tl.load(chs_ptr + (gc * H + h) * 3 + 2)
        cst = (gc * H + h) * K
        dv = tl.zeros([BT, BV], dtype=tl.float32)
        for kk in range(0, K, BK):
            ok = kk + tl.arange(0, BK)
            mk = ok < K
            kt = tl.load(k_ptr + r[:, None] * (H * K) + h * K + ok[None, :], mask=vr[:, None] & mk[None, :], other=0.0)
            dce = tl.load(dcs_ptr + cst * V + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            dv += tl.dot(kt, dce.to(kt.dtype))
        w_end = tl.where(vr, tl.exp(g - b_r + i_r - m_end), 0.0)
        dv = dv * w_end[:, None]
        for tb in range(sub, NSUB):
            c0 = t0 + tb * BT + ob
            vc = c0 < te
            b_c = tl.load(tok_ptr + h * T_all + c0, mask=vc, other=0.0)
            m_c = tl.load(tok_ptr + (H + h) * T_all + c0, mask=vc, other=0.0)
            inv_c = tl.load(scal_ptr + h * T_all + c0, mask=vc, other=0.0)
            s = tl.zeros([BT, BT], dtype=tl.float32)
            for kk in range(0, K, BK):
                ok = kk + tl.arange(0, BK)
                mk = ok < K
                qt = tl.load(q_ptr + c0[:, None] * (H * K) + h * K + ok[None, :], mask=vc[:, None] & mk[None, :], other=0.0)
                kt = tl.load(k_ptr + r[:, None] * (H * K) + h * K + ok[None, :], mask=vr[:, None] & mk[None, :], other=0.0)
                s += tl.dot(qt, tl.trans(kt))
            causal = (c0[:, None] >= r[None, :]) & vc[:, None] & vr[None, :]
            w = tl.where(causal, tl.exp(b_c[:, None] - b_r[None, :] + i_r[None, :] - m_c[:, None]), 0.0)
            p = s * w * scale
            do = tl.load(dh_ptr + c0[:, None] * (H * V) + h * V + ov[None, :], mask=vc[:, None] & mv[None, :], other=0.0)
            do = (do.to(tl.float32) * inv_c[:, None]).to(q_ptr.dtype.element_ty)
            dv += tl.dot(tl.trans(p.to(q_ptr.dtype.element_ty)), do)
        tl.store(dv_ptr + r[:, None] * (H * V) + h * V + ov[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=vr[:, None] & mv[None, :])
