"""Chunkwise mLSTM backward: exact gradients, normaliser paths included.

The cell is linear attention with an extra value column of ones (n is that column of C), read
out as h = o[:Dv] / (max(|o[Dv]|, exp(-m)) + eps). So with do = dh / den and
ds = -(dh . h) / den * sign(s) * [|s| > exp(-m)], the backward is a gated linear-attention
backward with dO' = [do, ds] and V' = [v, 1]. Gate gradients come from per-token dot products
(q . dq and k . dk sum the gradients of all log weights a token appears in) plus the path through
the stabiliser m, whose partial is -eps / den * (dh . h). Nothing is recomputed from scratch: the
forward saved the chunk-start states, the per-chunk and per-token gate scalars and s; the backward
re-reads q, k, v and forms each chunk's L x L score blocks once.

_prep_kernel       grid (cdiv(T_all, BT), H): per token 1/den, ds, the stabiliser partial g and q . dq.
_query_weight_kernel grid (cdiv(Dqk, BK), N_chunks, H): q~ = q exp(b + m_start - m) / (sqrt(Dqk) den)
                   and dn's own term per chunk, so the state kernel's loop carries nothing else.
_state_kernel      grid (cdiv(Dqk, BK), cdiv(Dv, BV), N_seq * H), launched twice (the last chunk
                   down to the second, then the first): the reverse recurrence
                   dC_start = exp(g + m_start - m_end) dC_end + q~^T dh (dn likewise with ds),
                   storing dC at every chunk end and the initial state's gradient.
_scores_kernel     grid (N_chunks * L / BT, H): per chunk the gated score blocks P = S W / den
                   (for dv) and dP~ = (dO V^T + ds) W (for dq and dk), once, in the operand
                   dtype; and k . dk's part within the chunk in fp32 (and dm0's row sums).
_dqk_kernel        grid (cdiv(Dqk, BK), N_chunks * L / BT, H): dq and dk for BT rows and a BK
                   slice from the states and the dP~ blocks; k . dk through the chunk-end state;
                   an interior chunk's <dC_end, C_start> + <dn_end, n_start>.
_dv_kernel         grid (cdiv(Dv, BV), N_chunks * L / BT, H): dv = sum_t P^T dh + w_end K dC_end.
_gate_grad_kernel  grid (N_seq * H,): di, df and dm0, walking each document backwards.

The gate gradients: di = k . dk + G. The gradient of the log forget gate at t is the
fixed-stabiliser part R_t (all pairs s < t <= u of key and query joined through f_t, plus s < t
reaching the final state) and the stabiliser part: g is each token's stabiliser partial (plus the
final state's, dmT - <dC_T, C_T> - <dn_T, n_T>, at the last token), G collects g over the tokens
whose m_t was set by the input gate at token j (m_t = i_j + sum of log forget since j), or by m0.
R_t is summed within t's chunk only, from terms that carry no large cancelling parts:
    R_t = decay * <dC_end, C_start> + sum_{s<t} kdk_inter_s + sum_{u>=t} (qdq_u - kdk_intra_u)
(qdq in closed form from the prep pass, kdk_intra from fp32 score blocks). The textbook form, a
reverse cumsum of q . dq - k . dk over the whole document, subtracts large partial sums whose bf16
rounding swamps small gradients. At a document's last chunk the same terms give <dC_T, C_T>, so
the two parts cancel exactly where they should.
dm0 (the gradient of scaling the initial state, which the outputs barely feel when that state
dominates them) is likewise formed without cancelling parts: the later chunks' share through the
first chunk's fp32 dC_end, the first chunk's own from within-chunk sums and dh . h rebuilt in
fp32 (_first_chunk_scale_grad says how), not as <c0, dc0> + <n0, dn0>.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fwd import _chunk_decay, _chunk_tile, _chunk_tokens, _intra_gates, _logsigmoid, _qk_block, _rows_of, _sequence_of


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
    gc, h, t0, ot, valid = _chunk_tokens(start_ptr, end_ptr, L)
    b = tl.load(tok_ptr + (h * T_all + t0) + ot, mask=valid, other=0.0)
    m = tl.load(tok_ptr + ((H + h) * T_all + t0) + ot, mask=valid, other=0.0)
    ds = tl.load(scal_ptr + ((H + h) * T_all + t0) + ot, mask=valid, other=0.0)
    inv_den = tl.load(scal_ptr + (h * T_all + t0) + ot, mask=valid, other=0.0)
    m_start = tl.load(chs_ptr + (gc * H + h) * 3)
    w0 = tl.where(valid, tl.exp(b + m_start - m), 0.0) * scale
    base, off, msk, ok, mk = _chunk_tile(t0, h, pid_k, ot, valid, H, K, BK)
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
        decay = _chunk_decay(chs_ptr, gc, h, H, True)
        qt = tl.load(qw_ptr + t0 * (H * K) + h * K + pid_k * BK + q_off, mask=mk[:, None] & valid[None, :], other=0.0)
        dht = tl.load(dh_ptr + t0 * (H * V) + h * V + pid_v * BV + v_off, mask=valid[:, None] & mv[None, :], other=0.0)
        dc = dc * decay + tl.dot(qt, dht.to(qt.dtype), input_precision=PREC)
        dn = dn * decay + dnd
    tl.store(dc_out_ptr + state_off * K * V + c_tile + kv_off, dc, mask=mkv)
    if pid_v == 0:
        tl.store(dn_out_ptr + state_off * K + pid_k * BK + ok, dn, mask=mk)


@triton.jit
def _scores_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, dh_ptr, tok_ptr, scal_ptr, start_ptr, end_ptr, p_ptr, dpw_ptr, kdk_ptr, xy_ptr,
    scale, T_all, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    XY: tl.constexpr,
):
    # For the BT query rows of one program and every key block at or before them in the chunk:
    # the gated scores P = S W / (sqrt(Dqk) den) that dv needs and dP~ = (dO V^T + ds) W that dq
    # and dk need, each formed once here and stored in the operand dtype (the same rounding as the
    # dots' operands), instead of once per Dqk or Dv tile in the gradient kernels. Also k . dk's
    # part within the chunk, sum_t dP~_ts S_ts / sqrt(Dqk), in fp32, per row block (the gate kernel sums them).
    # XY: also per row, in fp32, x = sum_s P_ts (dh_t . v_s) and y = sum_s P_ts (dh . h's and s's parts
    # from within the chunk, over den): what dm0 needs from a document's first chunk (the gate
    # kernel); only when the initial state wants gradients (it costs the kernel a 64-byte spill).
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
        x_r = tl.zeros([BT], dtype=tl.float32)
        y_r = tl.zeros([BT], dtype=tl.float32)
        for rb in range(0, sub + 1):
            c0 = t0 + rb * BT
            vc = ob < te - c0
            s = _qk_block(q_ptr + r0 * (H * K) + h * K, k_ptr, qk_off, ok, vr, vc, c0, h, H, K, BT, BK, PREC)
            dp = tl.zeros([BT, BT], dtype=tl.float32)
            for vv in range(0, V, BV):
                mv = vv + ov < V
                do = tl.load(dh_ptr + r0 * (H * V) + h * V + vv + v_off, mask=vr[:, None] & mv[None, :], other=0.0)
                vt = tl.load(v_ptr + c0 * (H * V) + h * V + vv + v_off, mask=vc[:, None] & mv[None, :], other=0.0)
                dp += tl.dot(do.to(vt.dtype), tl.trans(vt), input_precision=PREC)
            w = _intra_gates(tok_ptr, i_ptr, b_r, m_r, vr, r0, c0, te, h, ob, T_all, H)
            # dO = dh / den: 1/den scales the fp32 results, so dh enters the dot exact
            p = s * w * (scale * inv_r[:, None])
            dpw = (dp * inv_r[:, None] + ds_r[:, None]) * w
            tl.store(p_ptr + blk_base + rb * BT + blk_off, p.to(p_ptr.dtype.element_ty))
            tl.store(dpw_ptr + blk_base + rb * BT + blk_off, dpw.to(dpw_ptr.dtype.element_ty))
            tl.store(kdk_ptr + ((sub * H + h) * T_all + c0) + ob, tl.sum(dpw * s, 0) * scale, mask=vc)
            if XY:
                x_r += tl.sum(p * dp, 1)
                y_r += tl.sum(p, 1)
        if XY:
            tl.store(xy_ptr + (h * T_all + r0) + ob, x_r, mask=vr)
            tl.store(xy_ptr + ((H + h) * T_all + r0) + ob, y_r, mask=vr)


@triton.jit
def _dqk_kernel(
    q_ptr, k_ptr, v_ptr, dh_ptr, cs_ptr, ns_ptr, dcs_ptr, dns_ptr, chs_ptr, tok_ptr, scal_ptr, i_ptr,
    start_ptr, end_ptr, cu_ptr, first_ptr, doc_ptr, dpw_ptr, dq_ptr, dk_ptr, kinter_ptr, dlo_ptr, edot_ptr,
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
        for vv in range(0, V, BV):
            mv = vv + ov < V
            v_msk = vr[:, None] & mv[None, :]
            do = tl.load(dh_ptr + v_base + vv + v_off, mask=v_msk, other=0.0).to(dt)
            vt = tl.load(v_ptr + v_base + vv + v_off, mask=v_msk, other=0.0)
            cp = tl.load(cs_ptr + c_base + vv + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
            dce = tl.load(dcs_ptr + c_base + vv + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
            dq += tl.dot(do, tl.trans(cp.to(dt)), input_precision=PREC)
            dk += tl.dot(vt, tl.trans(dce.to(dt)), input_precision=PREC)
        dq = dq * inv_r[:, None]          # dO = dh / den on the fp32 side: dh enters the dot exact
        dd = tl.load(doc_ptr + gc)
        cu_next = tl.load(cu_ptr + dd + 1)
        if HAS_LO:
            # A document's last chunk meets the caller's dC_T: add the part of it that rounding
            # to the operand dtype dropped (dlo), so k . dk against the final state is exact.
            if te == cu_next:
                lo_base = (dd * H + h) * K * V + pid_k * BK * V
                for vv in range(0, V, BV):
                    mv = vv + ov < V
                    vt = tl.load(v_ptr + v_base + vv + v_off, mask=vr[:, None] & mv[None, :], other=0.0)
                    lo = tl.load(dlo_ptr + lo_base + vv + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
                    dk += tl.dot(vt, tl.trans(lo), input_precision=PREC)
        n_p = tl.load(ns_ptr + cst + pid_k * BK + ok, mask=mk, other=0.0)
        dn_e = tl.load(dns_ptr + cst + pid_k * BK + ok, mask=mk, other=0.0)
        if sub == 0:
            # an interior chunk's <dC_end, C_start> + <dn_end, n_start> for the gate gradients, from
            # the tiles just loaded (L2-warm; a branch in the loop above cost it registers); a
            # document's first and last chunk get theirs in fp32 in the gate kernel (0 here)
            e = tl.zeros([BK], dtype=tl.float32)
            if (gc != tl.load(first_ptr + dd)) & (te != cu_next):
                for vv in range(0, V, BV):
                    mv = vv + ov < V
                    cp = tl.load(cs_ptr + c_base + vv + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
                    dce = tl.load(dcs_ptr + c_base + vv + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
                    e += tl.sum(cp.to(tl.float32) * dce.to(tl.float32), 1)
                e += n_p * dn_e
            tl.store(edot_ptr + (gc * H + h) * tl.num_programs(0) + pid_k, tl.sum(e, 0))
        w0 = tl.where(vr, tl.exp(b_r + m_prev - m_r), 0.0)
        w_end = tl.where(vr, tl.exp(g - b_r + i_r - m_end), 0.0)
        dq = (dq + ds_r[:, None] * n_p[None, :]) * w0[:, None]
        dk = (dk + dn_e[None, :]) * w_end[:, None]
        # k . dk through the chunk-end state, for the gate gradients (the part within the chunk
        # comes from the scores kernel, in fp32)
        tl.store(kinter_ptr + ((pid_k * H + h) * T_all + r0) + ob, tl.sum(k_r.to(tl.float32) * dk, 1), mask=vr)

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


@triton.jit
def _affine_combine(c1, v1, c2, v2):
    # x -> c x + v, composed: first (c1, v1), then (c2, v2)
    return c1 * c2, c2 * v1 + v2


@triton.jit
def _flat_dot(a_ptr, b_ptr, n, BLOCK: tl.constexpr):
    # sum(a * b) over n contiguous elements: fp32 lanes, fp64 total
    o = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n, BLOCK):
        msk = s + o < n
        acc += (tl.load(a_ptr + s + o, mask=msk, other=0.0).to(tl.float32)
                * tl.load(b_ptr + s + o, mask=msk, other=0.0).to(tl.float32))
    return tl.sum(acc.to(tl.float64), 0)


@triton.jit
def _chunk_edot(edot_ptr, gc, h, valid, e_first, e_last, first, last, n_chunks, H: tl.constexpr, NKT: tl.constexpr):
    # <dC_end, C_start> + <dn_end, n_start> of chunk(s) gc: the dq/dk kernel's parts (interior
    # chunks) plus a document's first chunk's and last chunk's own, computed here in fp32
    e = tl.where(gc == first, e_first, 0.0) + tl.where((gc == last) & (n_chunks > 1), e_last, 0.0)
    for p in tl.static_range(NKT):
        e += tl.load(edot_ptr + (gc * H + h) * NKT + p, mask=valid, other=0.0).to(tl.float64)
    return e


@triton.jit
def _first_chunk_scale_grad(q_ptr, dh_ptr, c0_ptr, tok_ptr, scal_ptr, xy_ptr, chs_ptr, first, st, h, bos, eos, scale,
                            T_all, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr):
    """The outputs' gradient with respect to scaling the initial state by exp(delta) at fixed m,
    summed over a document's first chunk (the chunks after it see the state through dC_end):

        u_t = dh_t . (w0 C0^T q~_t - h_t sign(s_t) w0 n0 . q~_t) / den_t
            = dh_t . h_t (den_t - |s_t|) / den_t  +  (dh_t . h_t) sign(s_t) y_t  -  x_t

    (no s term at the floor), using h den = w0 C0^T q~ + I and s = w0 n0 . q~ + J, with x = dh . I /
    den and y = J / den the parts from within the chunk (the scores kernel's fp32 row sums). The
    first form, <c0, dc0> + <n0, dn0>, cancels two large terms whenever the initial state
    dominates; the second cancels only terms the size of the chunk's own. Both need dh . h far
    more exactly than h rounded to the output dtype gives it: it is rebuilt here in fp32 as
    w0 dh . (C0^T q~) / den + x."""
    ol = tl.arange(0, L)
    t = bos + ol
    ok = t < eos
    okk = tl.arange(0, BK)
    ovv = tl.arange(0, BV)
    inter = tl.zeros([L], dtype=tl.float32)
    for kk in range(0, K, BK):
        mk = kk + okk < K
        acc = tl.zeros([L, BK], dtype=tl.float32)
        for vv in range(0, V, BV):
            mv = vv + ovv < V
            dht = tl.load(dh_ptr + t[:, None] * (H * V) + h * V + vv + ovv[None, :], mask=ok[:, None] & mv[None, :],
                          other=0.0).to(tl.float32)
            ct = tl.load(c0_ptr + st * K * V + (kk + okk)[:, None] * V + vv + ovv[None, :],
                         mask=mk[:, None] & mv[None, :], other=0.0)
            acc += tl.dot(dht, tl.trans(ct), input_precision="ieee")
        qt = tl.load(q_ptr + t[:, None] * (H * K) + h * K + kk + okk[None, :], mask=ok[:, None] & mk[None, :],
                     other=0.0).to(tl.float32)
        inter += tl.sum(acc * qt, 1)
    b = tl.load(tok_ptr + h * T_all + t, mask=ok, other=0.0)
    m = tl.load(tok_ptr + (H + h) * T_all + t, mask=ok, other=0.0)
    s = tl.load(tok_ptr + (2 * H + h) * T_all + t, mask=ok, other=0.0).to(tl.float64)
    inv_den = tl.load(scal_ptr + h * T_all + t, mask=ok, other=1.0).to(tl.float64)
    x = tl.load(xy_ptr + h * T_all + t, mask=ok, other=0.0).to(tl.float64)
    y = tl.load(xy_ptr + (H + h) * T_all + t, mask=ok, other=0.0).to(tl.float64)
    w0 = tl.exp(b + tl.load(chs_ptr + (first * H + h) * 3) - m)
    dhh = (inter * w0 * scale).to(tl.float64) * inv_den + x
    floor = tl.exp(-m).to(tl.float64)
    sgn = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
    u = tl.where(tl.abs(s) > floor, dhh * (1.0 - tl.abs(s) * inv_den) + dhh * sgn * y - x, dhh - x)
    return tl.sum(tl.where(ok, u, 0.0), 0)


@triton.jit
def _gate_grad_kernel(
    i_ptr, f_ptr, m0_ptr, dmT_ptr, tok_ptr, scal_ptr, kinter_ptr, kintra_ptr, edot_ptr, chs_ptr, cu_ptr, first_ptr,
    c0_ptr, n0_ptr, xy_ptr, q_ptr, dh_ptr, dcf_ptr, dnf_ptr, dct_ptr, dnt_ptr, cs_ptr, ns_ptr,
    di_ptr, df_ptr, dm0_ptr, scale, T_all, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BLOCK: tl.constexpr, NKT: tl.constexpr, NSUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STATE_GRAD: tl.constexpr,
):
    # The gate gradients of one document and head (the terms: see this module's docstring),
    # walking its tokens backwards BLOCK at a time. Each block is loaded reversed (index i is token
    # blk_end - 1 - i), so the two backward recurrences are forward scans:
    #   R_t  = decay_c <dC_end, C_start>_c + sum_{chunk start <= u < t} kdk_inter_u
    #          + sum_{t <= u < chunk end} (qdq_u - kdk_intra_u)          (chunk-local sums)
    #   B_t  = g_t + a_{t+1} B_{t+1},  a_t = 0 where the input gate set m_t (a record), else 1
    # B_t sums the stabiliser partials g from t to just before the next record: a record's di
    # takes it (the tokens whose m it set), df takes A_t = a_t B_t, and A at the document's first
    # token is what m0 owns (dm0's share). All sums in fp64.
    seq, h, bos, eos, first, n_chunks = _sequence_of(tl.program_id(0), cu_ptr, first_ptr, H, L)
    NCB: tl.constexpr = BLOCK // L
    o2 = (tl.arange(0, NCB)[:, None] * L + tl.arange(0, L)[None, :])        # (NCB, L): reversed index
    m0 = tl.load(m0_ptr + seq * H + h)
    last = first + n_chunks - 1
    has = n_chunks > 0                                              # an empty document has no chunk to read
    # the first chunk's dC_end (fp32, from the state walk) against c0, the caller's dC_T against
    # the last chunk's C_start: where the gate gradients cancel them against <dc0, c0>, <dC_T, C_T>
    st = (seq * H + h).to(tl.int64)
    e_first = _flat_dot(dcf_ptr + st * K * V, c0_ptr + st * K * V, K * V, 2048) + _flat_dot(dnf_ptr + st * K, n0_ptr + st * K, K, 256)
    lst = (tl.maximum(last, 0) * H + h).to(tl.int64)
    many = n_chunks > 1                                             # else the first chunk is the last: e_first
    e_last = _flat_dot(dct_ptr + st * K * V, cs_ptr + lst * K * V, tl.where(many, K * V, 0), 2048) + _flat_dot(
        dnt_ptr + st * K, ns_ptr + lst * K, tl.where(many, K, 0), 256)
    # <dC_T, C_T> + <dn_T, n_T> from the last chunk's terms, so that the final state's stabiliser
    # partial dmT - <.,.> cancels against R exactly as the terms do
    ol = tl.arange(0, L)
    t_l = bos + (n_chunks - 1) * L + ol
    vl = t_l < eos
    kin = tl.zeros([L], dtype=tl.float64)
    for p in tl.static_range(NKT):
        kin += tl.load(kinter_ptr + (p * H + h) * T_all + t_l, mask=vl, other=0.0).to(tl.float64)
    dec_l = _chunk_decay(chs_ptr, last, h, H, has).to(tl.float64)
    final_dot = _chunk_edot(edot_ptr, last, h, has, e_first, e_last, first, last, n_chunks, H, NKT) * dec_l + tl.sum(kin, 0)
    g_end = tl.load(dmT_ptr + seq * H + h).to(tl.float64) - final_dot

    b_in = tl.zeros([1], dtype=tl.float64).sum(0)                   # B of the token after the block
    n_blk = tl.cdiv(eos - bos, BLOCK)
    for bb in range(0, n_blk):
        blk = bos + (n_blk - 1 - bb) * BLOCK
        t = blk + BLOCK - 1 - o2                                    # token of each slot
        valid = t < eos
        nxt = (t + 1) < eos
        ig = tl.load(i_ptr + t * H + h, mask=valid, other=0.0).to(tl.float32)
        fg = tl.load(f_ptr + t * H + h, mask=valid, other=0.0).to(tl.float32)
        m_prev = tl.load(tok_ptr + (H + h) * T_all + t - 1, mask=valid & (t > bos), other=0.0)
        m_prev = tl.where(t > bos, m_prev, m0)
        rec = valid & (ig > _logsigmoid(fg) + m_prev)
        ig_n = tl.load(i_ptr + (t + 1) * H + h, mask=nxt, other=0.0).to(tl.float32)
        fg_n = tl.load(f_ptr + (t + 1) * H + h, mask=nxt, other=0.0).to(tl.float32)
        m_t = tl.load(tok_ptr + (H + h) * T_all + t, mask=valid, other=0.0)
        rec_n = nxt & (ig_n > _logsigmoid(fg_n) + m_t)
        g = tl.load(scal_ptr + (2 * H + h) * T_all + t, mask=valid, other=0.0).to(tl.float64)
        g = g + tl.where(valid & (t == eos - 1), g_end, 0.0)
        qdq = tl.load(scal_ptr + (3 * H + h) * T_all + t, mask=valid, other=0.0).to(tl.float64)
        k_in = tl.zeros([NCB, L], dtype=tl.float64)
        for p in tl.static_range(NKT):
            k_in += tl.load(kinter_ptr + (p * H + h) * T_all + t, mask=valid, other=0.0).to(tl.float64)
        k_ia = tl.zeros([NCB, L], dtype=tl.float64)
        for p in tl.static_range(NSUB):
            k_ia += tl.load(kintra_ptr + (p * H + h) * T_all + t, mask=valid, other=0.0).to(tl.float64)
        # chunk-local sums: along a row, tokens run backwards within one chunk
        gc = first + (blk - bos) // L + (NCB - 1 - tl.arange(0, NCB))
        vc = gc < first + n_chunks
        dec = _chunk_decay(chs_ptr, gc, h, H, vc).to(tl.float64)
        base = _chunk_edot(edot_ptr, gc, h, vc, e_first, e_last, first, last, n_chunks, H, NKT) * dec
        r = (base[:, None] + (tl.sum(k_in, 1)[:, None] - tl.cumsum(k_in, 1))
             + tl.cumsum(qdq - k_ia, 1))
        # the stabiliser recurrence over the whole block, in slot order (tokens backwards)
        coef = tl.where(valid, tl.where(rec_n, 0.0, 1.0), 1.0).to(tl.float64)
        coef = tl.where(valid & ~nxt, 0.0, coef)                   # the document's last token: nothing after
        sc, sv = tl.associative_scan((tl.reshape(coef, [BLOCK]), tl.reshape(g, [BLOCK])), 0, _affine_combine)
        b1 = sc * b_in + sv
        b_t = tl.reshape(b1, [NCB, L])
        a_t = tl.where(rec, 0.0, b_t)
        tl.store(di_ptr + t * H + h, (k_in + k_ia + tl.where(rec, b_t, 0.0)).to(di_ptr.dtype.element_ty), mask=valid)
        df = (r + a_t) * tl.sigmoid(-fg).to(tl.float64)
        tl.store(df_ptr + t * H + h, df.to(df_ptr.dtype.element_ty), mask=valid)
        b_in = tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, b1, 0.0), 0)
        if bb == n_blk - 1:
            # dm0: c0 and n0 scale with exp(m0): seen by the later chunks through the first chunk's
            # dC_end (e_first) and by the first chunk's own outputs (u); plus the stabiliser partials m0 owns
            a_first = tl.sum(tl.reshape(tl.where(t == bos, a_t, 0.0), [BLOCK]), 0)
            dm0 = _chunk_decay(chs_ptr, first, h, H, True).to(tl.float64) * e_first + a_first
            if STATE_GRAD:
                dm0 += _first_chunk_scale_grad(q_ptr, dh_ptr, c0_ptr, tok_ptr, scal_ptr, xy_ptr, chs_ptr, first, st, h,
                                               bos, eos, scale, T_all, H, K, V, L, BK, BV)
            tl.store(dm0_ptr + st, dm0.to(tl.float32))
    if n_chunks == 0:
        tl.store(dm0_ptr + st, tl.load(dmT_ptr + st))               # an empty document passes m0 through
