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

_prep_kernel       grid (cdiv(T_all, BT), H): per token 1/den, ds, the stabiliser partial g and q . dq.
_query_weight_kernel grid (cdiv(Dqk, BK), N_chunks, H): q~ = q exp(b + m_start - m) / (sqrt(Dqk) den)
                   and dn's own term per chunk, so the state kernel's loop carries nothing else.
_state_kernel      grid (cdiv(Dqk, BK), cdiv(Dv, BV), N_seq * H): the reverse recurrence
                   dC_start = exp(g + m_start - m_end) dC_end + (q~ * w0)^T dO (dn likewise with
                   ds) in one sequential walk per tile, storing dC at every chunk end, the initial
                   state's gradient, and per chunk and row of the tile the partial dots
                   <dC_end, C_start> + <dn_end, n_start> of the gate gradients.
_dqk_kernel        grid (cdiv(Dqk, BK), N_chunks * L / BT, H): dq and dk for BT rows and a BK
                   slice; dP = dO V^T + ds is rebuilt from Dv tiles; the diagonal block is shared
                   by dq and dk. Also stores k . dk partial sums per BK slice (inter and intra apart).
_dv_kernel         grid (cdiv(Dv, BV), N_chunks * L / BT, H): dv = sum_t (S * W)^T dO + w_end K dC_end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fwd import _rows_of, _sequence_of


@triton.jit
def _prep_kernel(dh_ptr, h_ptr, tok_ptr, scal_ptr, eps, T_all, H: tl.constexpr, V: tl.constexpr,
                 BT: tl.constexpr, BV: tl.constexpr):
    # 64-bit scalar bases, 32-bit offsets inside a tile (here and below): fewer address registers.
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    r0 = pid_t.to(tl.int64) * BT
    ob = tl.arange(0, BT)
    vr = ob < T_all - r0
    ov = tl.arange(0, BV)
    dhh = tl.zeros([BT], dtype=tl.float32)
    base = r0 * (H * V) + h * V
    for vv in range(0, V, BV):
        msk = vr[:, None] & (vv + ov < V)[None, :]
        off = ob[:, None] * (H * V) + vv + ov[None, :]
        dhh += tl.sum(tl.load(dh_ptr + base + off, mask=msk, other=0.0).to(tl.float32)
                      * tl.load(h_ptr + base + off, mask=msk, other=0.0).to(tl.float32), 1)
    m = tl.load(tok_ptr + ((H + h) * T_all + r0) + ob, mask=vr, other=0.0)
    s = tl.load(tok_ptr + ((2 * H + h) * T_all + r0) + ob, mask=vr, other=0.0)
    floor = tl.exp(-m)
    inv_den = 1.0 / (tl.maximum(tl.abs(s), floor) + eps)
    sgn = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
    ds = tl.where(tl.abs(s) > floor, -dhh * inv_den * sgn, 0.0)
    tl.store(scal_ptr + (h * T_all + r0) + ob, inv_den, mask=vr)
    tl.store(scal_ptr + ((H + h) * T_all + r0) + ob, ds, mask=vr)
    tl.store(scal_ptr + ((2 * H + h) * T_all + r0) + ob, -eps * dhh * inv_den, mask=vr)
    # q . dq in closed form: scaling q_t by a scales num_t and s_t alike, so h_t moves only through
    # eps (or not at all below the floor). Summing q * dq instead cancels two terms of size dh . h
    # and, in bf16, leaves rounding noise far above the true value in the gate gradients.
    tl.store(scal_ptr + ((3 * H + h) * T_all + r0) + ob, tl.where(tl.abs(s) > floor, eps * dhh * inv_den, dhh),
             mask=vr)


@triton.jit
def _query_weight_kernel(q_ptr, tok_ptr, scal_ptr, chs_ptr, start_ptr, end_ptr, qw_ptr, dns_ptr, scale, T_all,
                         H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    # The queries as the chunk-start state sees them, q~ = q exp(b + m_start - m) / sqrt(Dqk),
    # with 1/den folded in (dC's term is q~^T dh / den): rounded once to the operand dtype, while
    # dh enters the state kernel's dot exact. Rounding dh / den to the operand dtype as well cost
    # the initial state's gradients (dm0 = <c0, dc0> + ... cancels) 10x their precision (fp16, CPU).
    # Also dn's own term per chunk, sum_t q~_t ds_t in fp32 (ds already holds 1/den), written into
    # the chunk's dn slot for the state kernel.
    pid_k = tl.program_id(0)
    gc = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)  # int64: h * T_all and friends must not wrap
    t0 = tl.load(start_ptr + gc)
    te = tl.load(end_ptr + gc)
    ot = tl.arange(0, L)
    ok = tl.arange(0, BK)
    valid = ot < te - t0
    mk = pid_k * BK + ok < K
    b = tl.load(tok_ptr + (h * T_all + t0) + ot, mask=valid, other=0.0)
    m = tl.load(tok_ptr + ((H + h) * T_all + t0) + ot, mask=valid, other=0.0)
    ds = tl.load(scal_ptr + ((H + h) * T_all + t0) + ot, mask=valid, other=0.0)
    inv_den = tl.load(scal_ptr + (h * T_all + t0) + ot, mask=valid, other=0.0)
    m_start = tl.load(chs_ptr + (gc * H + h) * 3)
    w0 = tl.where(valid, tl.exp(b + m_start - m), 0.0) * scale
    base = t0 * (H * K) + h * K + pid_k * BK                 # int64 scalar; int32 offsets in the tile
    off = ot[:, None] * (H * K) + ok[None, :]
    msk = valid[:, None] & mk[None, :]
    qw = tl.load(q_ptr + base + off, mask=msk, other=0.0).to(tl.float32) * w0[:, None]
    tl.store(qw_ptr + base + off, (qw * inv_den[:, None]).to(qw_ptr.dtype.element_ty), mask=msk)
    tl.store(dns_ptr + (gc * H + h) * K + pid_k * BK + ok, tl.sum(qw * ds[:, None], 0), mask=mk)


@triton.jit
def _state_kernel(
    qw_ptr, dh_ptr, chs_ptr, cu_ptr, first_ptr, dc_in_ptr, dn_in_ptr, dcs_ptr, dns_ptr, dc_out_ptr, dn_out_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, FIRST: tl.constexpr,
):
    # Launched twice: FIRST=False walks each document's chunks from the last down to the second,
    # from dC_T, and leaves dC_end of the first chunk in fp32 (the gate gradients' <dC_end, c0>
    # must see the value that dm0's <dc0, c0> cancels it against); FIRST=True takes that chunk's
    # step to dc0. Two launches rather than a peeled step or a branch in the loop: either took
    # the loop's registers from ~105 to ~175-240 (triton 3.6, sm_90), and it is latency-bound.
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    seq, h, bos, eos, first, n_chunks = _sequence_of(tl.program_id(2), cu_ptr, first_ptr, H, L)
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mk = pid_k * BK + ok < K
    mv = pid_v * BV + ov < V
    mkv = mk[:, None] & mv[None, :]
    mn = mk & (ok * 0 + pid_v == 0)                         # n is the pid_v == 0 programs' work
    ot = tl.arange(0, L)
    kv_off = ok[:, None] * V + ov[None, :]
    c_tile = pid_k * BK * V + pid_v * BV
    state_off = (seq * H + h).to(tl.int64)
    dc = tl.load(dc_in_ptr + state_off * K * V + c_tile + kv_off, mask=mkv, other=0.0).to(tl.float32)
    dn = tl.load(dn_in_ptr + state_off * K + pid_k * BK + ok, mask=mk, other=0.0).to(tl.float32)
    q_off = ok[:, None] + ot[None, :] * (H * K)          # q~ read transposed: (BK, L)
    v_off = ot[:, None] * (H * V) + ov[None, :]
    if FIRST:
        steps = tl.minimum(n_chunks, 1)
    else:
        steps = tl.maximum(n_chunks - 1, 0)
    for jj in range(0, steps):
        j = n_chunks - 1 - jj
        if FIRST:
            j = 0
        gc = first + j
        cst = (gc * H + h) * K
        tl.store(dcs_ptr + cst * V + c_tile + kv_off, dc.to(dcs_ptr.dtype.element_ty), mask=mkv)
        # n's slot: the pid_v == 0 programs read this chunk's own term, then store dn_end over it
        dnd = tl.load(dns_ptr + cst + pid_k * BK + ok, mask=mn, other=0.0)
        tl.store(dns_ptr + cst + pid_k * BK + ok, dn, mask=mn)
        t0 = bos + j * L
        valid = ot < eos - t0
        decay = tl.exp(tl.load(chs_ptr + (gc * H + h) * 3 + 1) + tl.load(chs_ptr + (gc * H + h) * 3)
                       - tl.load(chs_ptr + (gc * H + h) * 3 + 2))
        qt = tl.load(qw_ptr + t0 * (H * K) + h * K + pid_k * BK + q_off, mask=mk[:, None] & valid[None, :], other=0.0)
        dht = tl.load(dh_ptr + t0 * (H * V) + h * V + pid_v * BV + v_off, mask=valid[:, None] & mv[None, :], other=0.0)
        dc = dc * decay + tl.dot(qt, dht.to(qt.dtype), input_precision=PREC)
        dn = dn * decay + dnd
    tl.store(dc_out_ptr + state_off * K * V + c_tile + kv_off, dc, mask=mkv)
    if pid_v == 0:
        tl.store(dn_out_ptr + state_off * K + pid_k * BK + ok, dn, mask=mk)


@triton.jit
def _scores_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, dh_ptr, tok_ptr, scal_ptr, start_ptr, end_ptr, p_ptr, dpw_ptr, kdk_ptr,
    scale, T_all, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    # For the BT query rows of one program and every key block at or before them in the chunk:
    # the gated scores P = S W / (sqrt(Dqk) den) that dv needs and dP~ = (dO V^T + ds) W that dq
    # and dk need, each formed once here and stored in the operand dtype (the same rounding as the
    # dots' operands), instead of once per Dqk or Dv tile in the gradient kernels. Also k . dk's
    # part within the chunk, sum_t dP~_ts S_ts / sqrt(Dqk), in fp32, per row block (summed on the host).
    pid_c = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    gc, sub, t0, te, r0 = _rows_of(pid_c, start_ptr, end_ptr, L, BT)
    if r0 < te:
        ob = tl.arange(0, BT)
        vr = ob < te - r0
        ok = tl.arange(0, BK)
        ov = tl.arange(0, BV)
        b_r = tl.load(tok_ptr + (h * T_all + r0) + ob, mask=vr, other=0.0)
        m_r = tl.load(tok_ptr + ((H + h) * T_all + r0) + ob, mask=vr, other=0.0)
        inv_r = tl.load(scal_ptr + (h * T_all + r0) + ob, mask=vr, other=0.0)
        ds_r = tl.load(scal_ptr + ((H + h) * T_all + r0) + ob, mask=vr, other=0.0)
        qk_off = ob[:, None] * (H * K) + ok[None, :]
        v_off = ob[:, None] * (H * V) + ov[None, :]
        blk_off = ob[:, None] * L + ob[None, :]
        blk_base = ((gc * H + h) * L + sub * BT) * L
        for rb in range(0, sub + 1):
            c0 = t0 + rb * BT
            vc = ob < te - c0
            s = tl.zeros([BT, BT], dtype=tl.float32)
            for kk in range(0, K, BK):
                mk = kk + ok < K
                qt = tl.load(q_ptr + r0 * (H * K) + h * K + kk + qk_off, mask=vr[:, None] & mk[None, :], other=0.0)
                kt = tl.load(k_ptr + c0 * (H * K) + h * K + kk + qk_off, mask=vc[:, None] & mk[None, :], other=0.0)
                s += tl.dot(qt, tl.trans(kt), input_precision=PREC)
            dp = tl.zeros([BT, BT], dtype=tl.float32)
            for vv in range(0, V, BV):
                mv = vv + ov < V
                do = tl.load(dh_ptr + r0 * (H * V) + h * V + vv + v_off, mask=vr[:, None] & mv[None, :], other=0.0)
                vt = tl.load(v_ptr + c0 * (H * V) + h * V + vv + v_off, mask=vc[:, None] & mv[None, :], other=0.0)
                dp += tl.dot(do.to(vt.dtype), tl.trans(vt), input_precision=PREC)
            b_c = tl.load(tok_ptr + (h * T_all + c0) + ob, mask=vc, other=0.0)
            i_c = tl.load(i_ptr + (c0 * H + h) + ob * H, mask=vc, other=0.0).to(tl.float32)
            causal = (ob[:, None] + sub * BT >= ob[None, :] + rb * BT) & vr[:, None] & vc[None, :]
            w = tl.where(causal, tl.exp(b_r[:, None] - b_c[None, :] + i_c[None, :] - m_r[:, None]), 0.0)
            # dO = dh / den: 1/den scales the fp32 results, so dh enters the dot exact
            p = s * w * (scale * inv_r[:, None])
            dpw = (dp * inv_r[:, None] + ds_r[:, None]) * w
            tl.store(p_ptr + blk_base + rb * BT + blk_off, p.to(p_ptr.dtype.element_ty))
            tl.store(dpw_ptr + blk_base + rb * BT + blk_off, dpw.to(dpw_ptr.dtype.element_ty))
            tl.store(kdk_ptr + ((sub * H + h) * T_all + c0) + ob, tl.sum(dpw * s, 0) * scale, mask=vc)


@triton.jit
def _dqk_kernel(
    q_ptr, k_ptr, v_ptr, dh_ptr, cs_ptr, ns_ptr, dcs_ptr, dns_ptr, chs_ptr, tok_ptr, scal_ptr, i_ptr,
    start_ptr, end_ptr, dpw_ptr, dq_ptr, dk_ptr, part_ptr, cdoc_ptr, dlo_ptr, inner_ptr, edot_ptr,
    scale, T_all, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    HAS_LO: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    NSUB: tl.constexpr = L // BT
    gc, sub, t0, te, r0 = _rows_of(pid_c, start_ptr, end_ptr, L, BT)
    if r0 < te:
        ob = tl.arange(0, BT)
        vr = ob < te - r0
        ok = tl.arange(0, BK)
        ov = tl.arange(0, BV)
        mk = pid_k * BK + ok < K
        b_r = tl.load(tok_ptr + (h * T_all + r0) + ob, mask=vr, other=0.0)
        m_r = tl.load(tok_ptr + ((H + h) * T_all + r0) + ob, mask=vr, other=0.0)
        i_r = tl.load(i_ptr + (r0 * H + h) + ob * H, mask=vr, other=0.0).to(tl.float32)
        inv_r = tl.load(scal_ptr + (h * T_all + r0) + ob, mask=vr, other=0.0)
        ds_r = tl.load(scal_ptr + ((H + h) * T_all + r0) + ob, mask=vr, other=0.0)
        m_prev = tl.load(chs_ptr + (gc * H + h) * 3)
        g = tl.load(chs_ptr + (gc * H + h) * 3 + 1)
        m_end = tl.load(chs_ptr + (gc * H + h) * 3 + 2)
        cst = (gc * H + h) * K
        qk_off = ob[:, None] * (H * K) + ok[None, :]
        v_off = ob[:, None] * (H * V) + ov[None, :]
        c_off = ok[:, None] * V + ov[None, :]
        qk_base = r0 * (H * K) + h * K + pid_k * BK
        qk_msk = vr[:, None] & mk[None, :]
        k_r = tl.load(k_ptr + qk_base + qk_off, mask=qk_msk, other=0.0)
        dt = k_r.dtype
        v_base = r0 * (H * V) + h * V
        c_base = cst * V + pid_k * BK * V

        # inter-chunk terms: dO C_start^T (for dq) and V dC_end^T (for dk), over Dv tiles
        dq = tl.zeros([BT, BK], dtype=tl.float32)
        dk = tl.zeros([BT, BK], dtype=tl.float32)
        # an interior chunk's <dC_end, C_start> + <dn_end, n_start> (for the gate gradients), from
        # the tiles loaded here anyway; a document's first and last chunk get theirs in fp32 on the host
        edot = (sub == 0) & (tl.load(inner_ptr + gc) != 0)
        e = tl.zeros([BK], dtype=tl.float32)
        for vv in range(0, V, BV):
            mv = vv + ov < V
            v_msk = vr[:, None] & mv[None, :]
            do = tl.load(dh_ptr + v_base + vv + v_off, mask=v_msk, other=0.0).to(dt)
            vt = tl.load(v_ptr + v_base + vv + v_off, mask=v_msk, other=0.0)
            cp = tl.load(cs_ptr + c_base + vv + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
            dce = tl.load(dcs_ptr + c_base + vv + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
            dq += tl.dot(do, tl.trans(cp.to(dt)), input_precision=PREC)
            dk += tl.dot(vt, tl.trans(dce.to(dt)), input_precision=PREC)
            if edot:
                e += tl.sum(cp.to(tl.float32) * dce.to(tl.float32), 1)
        dq = dq * inv_r[:, None]          # dO = dh / den on the fp32 side: dh enters the dot exact
        if HAS_LO:
            # A document's last chunk meets the caller's dC_T: add the part of it that rounding
            # to the operand dtype dropped (dlo), so k . dk against the final state is exact.
            dd = tl.load(cdoc_ptr + gc)
            if dd >= 0:
                lo_base = (dd * H + h) * K * V + pid_k * BK * V
                for vv in range(0, V, BV):
                    mv = vv + ov < V
                    vt = tl.load(v_ptr + v_base + vv + v_off, mask=vr[:, None] & mv[None, :], other=0.0)
                    lo = tl.load(dlo_ptr + lo_base + vv + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
                    dk += tl.dot(vt, tl.trans(lo), input_precision=PREC)
        n_p = tl.load(ns_ptr + cst + pid_k * BK + ok, mask=mk, other=0.0)
        dn_e = tl.load(dns_ptr + cst + pid_k * BK + ok, mask=mk, other=0.0)
        if edot:
            tl.store(edot_ptr + (gc * H + h) * tl.num_programs(0) + pid_k, tl.sum(e + n_p * dn_e, 0))
        w0 = tl.where(vr, tl.exp(b_r + m_prev - m_r), 0.0)
        w_end = tl.where(vr, tl.exp(g - b_r + i_r - m_end), 0.0)
        dq = (dq + ds_r[:, None] * n_p[None, :]) * w0[:, None]
        dk = (dk + dn_e[None, :]) * w_end[:, None]
        # k . dk through the chunk-end state, for the gate gradients (the part within the chunk
        # comes from the scores kernel, in fp32)
        tl.store(part_ptr + ((pid_k * H + h) * T_all + r0) + ob, tl.sum(k_r.to(tl.float32) * dk, 1), mask=vr)

        # within the chunk: dq from the key blocks at or before these rows, dk from the query
        # blocks at or after them, with the scores kernel's dP~ blocks
        blk_off = ob[:, None] * L + ob[None, :]
        chunk_blk = (gc * H + h) * L * L
        for rb in range(0, sub + 1):
            c0 = t0 + rb * BT
            dpw = tl.load(dpw_ptr + chunk_blk + sub * BT * L + rb * BT + blk_off, mask=vr[:, None], other=0.0)
            kt = tl.load(k_ptr + c0 * (H * K) + h * K + pid_k * BK + qk_off,
                         mask=(ob < te - c0)[:, None] & mk[None, :], other=0.0)
            dq += tl.dot(dpw, kt, input_precision=PREC)
        for tb in range(sub, NSUB):
            c0 = t0 + tb * BT
            vc = ob < te - c0
            dpw = tl.load(dpw_ptr + chunk_blk + tb * BT * L + sub * BT + blk_off, mask=vc[:, None], other=0.0)
            qt = tl.load(q_ptr + c0 * (H * K) + h * K + pid_k * BK + qk_off, mask=vc[:, None] & mk[None, :], other=0.0)
            dk += tl.dot(tl.trans(dpw), qt, input_precision=PREC) * scale
        tl.store(dq_ptr + qk_base + qk_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qk_msk)
        tl.store(dk_ptr + qk_base + qk_off, dk.to(dk_ptr.dtype.element_ty), mask=qk_msk)


@triton.jit
def _dv_kernel(
    k_ptr, i_ptr, dh_ptr, dcs_ptr, chs_ptr, tok_ptr, start_ptr, end_ptr, p_ptr, dv_ptr, T_all,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    # dv = w_end K dC_end + sum over the query blocks at or after these rows of P^T dh
    # (P, from the scores kernel, already holds 1/den)
    pid_v = tl.program_id(0)
    pid_c = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    NSUB: tl.constexpr = L // BT
    gc, sub, t0, te, r0 = _rows_of(pid_c, start_ptr, end_ptr, L, BT)
    if r0 < te:
        dt = k_ptr.dtype.element_ty
        ob = tl.arange(0, BT)
        vr = ob < te - r0
        ok = tl.arange(0, BK)
        ov = tl.arange(0, BV)
        mv = pid_v * BV + ov < V
        b_r = tl.load(tok_ptr + (h * T_all + r0) + ob, mask=vr, other=0.0)
        i_r = tl.load(i_ptr + (r0 * H + h) + ob * H, mask=vr, other=0.0).to(tl.float32)
        g = tl.load(chs_ptr + (gc * H + h) * 3 + 1)
        m_end = tl.load(chs_ptr + (gc * H + h) * 3 + 2)
        cst = (gc * H + h) * K
        qk_off = ob[:, None] * (H * K) + ok[None, :]
        v_off = ob[:, None] * (H * V) + ov[None, :]
        c_off = ok[:, None] * V + ov[None, :]
        k_base = r0 * (H * K) + h * K
        dv = tl.zeros([BT, BV], dtype=tl.float32)
        for kk in range(0, K, BK):
            mk = kk + ok < K
            kt = tl.load(k_ptr + k_base + kk + qk_off, mask=vr[:, None] & mk[None, :], other=0.0)
            dce = tl.load(dcs_ptr + cst * V + kk * V + pid_v * BV + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
            dv += tl.dot(kt, dce.to(dt), input_precision=PREC)
        w_end = tl.where(vr, tl.exp(g - b_r + i_r - m_end), 0.0)
        dv = dv * w_end[:, None]
        blk_off = ob[:, None] * L + ob[None, :]
        chunk_blk = (gc * H + h) * L * L
        for tb in range(sub, NSUB):
            c0 = t0 + tb * BT
            vc = ob < te - c0
            p = tl.load(p_ptr + chunk_blk + tb * BT * L + sub * BT + blk_off, mask=vc[:, None], other=0.0)
            do = tl.load(dh_ptr + c0 * (H * V) + h * V + pid_v * BV + v_off, mask=vc[:, None] & mv[None, :], other=0.0)
            dv += tl.dot(tl.trans(p), do.to(dt), input_precision=PREC)
        tl.store(dv_ptr + r0 * (H * V) + h * V + pid_v * BV + v_off, dv.to(dv_ptr.dtype.element_ty),
                 mask=vr[:, None] & mv[None, :])
