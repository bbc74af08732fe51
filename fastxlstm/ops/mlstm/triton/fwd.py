"""Chunkwise mLSTM forward: the states at every chunk start, then the outputs in parallel.

Sequences are packed along time (cu_seqlens; a dense (B, T) batch is B sequences of T), and
chunks of L tokens never straddle a sequence boundary (the last chunk of each sequence may be
short; masked, never padded in memory). Chunk c covers tokens [start[c], end[c]).

Chunk-start states, three launches:
_chunk_gate_kernel  grid (cdiv(Dqk, BK), N_chunks, H), fully parallel: per token the chunk-local
                    cumulative log forget b and the running max of i - b; per chunk its log decay g
                    and a = g + max(i - b); the keys weighted against the chunk's own maximum,
                    k~ = k exp(i - b - max(i - b)), and n's term per chunk. It needs no stabiliser,
                    so a call's first launch already does real work.
_chunk_stab_kernel  grid (N_seq * H,): the stabiliser across chunks, m_end = max(m_start + g, a),
                    a max-plus scan over blocks of chunks; per chunk (m_start, g, m_end).
_state_kernel       grid (cdiv(Dqk, BK), cdiv(Dv, BV), N_seq * H). One program walks all chunks of
                    one sequence and head for a BK x BV tile of C (n by the pid_v == 0 programs) in
                    fp32 registers: loads and one dot per chunk scaled by exp(a - m_end), C the only
                    dependence carried (with the gate work inside, the loop measured 2x slower on
                    the H200).
Then:
_out_kernel     grid (cdiv(Dv, BV), N_chunks * L / BT, H). One program owns BT query rows of one
                chunk and a BV slice of h: h = (w0 q~ C_start + sum_j (q~ k_j^T * W) v_j) / den,
                looping over Dqk tiles for the inter-chunk term and over the key sub-blocks of the
                chunk (causal) for the intra-chunk term; it also stores s = q~ . n (the signed
                denominator before the max), which the backward uses to rebuild den, and each token's m.
_score_blocks_kernel  (with CONFIG fwd_out P=True) the intra-chunk gated score blocks, each
                token's m and row sum, formed once before _out_kernel, which then reads the
                blocks instead of forming them once per Dv tile.
All exponents are <= 0 by construction of m (see native.py), so nothing overflows. Scalar bases
are int64 (T * H * D may pass 2**31); offsets inside a tile are int32 (fewer address registers).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _max_fn(a, b):
    return tl.maximum(a, b)


@triton.jit
def _logsigmoid(x):
    # log(1 + exp(-|x|)) with exp(-|x|) <= 1: no overflow; absolute error <= 6e-8.
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sequence_of(pid, cu_ptr, first_ptr, H: tl.constexpr, L: tl.constexpr):
    """A per-(sequence, head) program's sequence and head, its token span [bos, eos), its first
    chunk and its number of chunks (int64: h * T_all and friends must not wrap)."""
    seq = pid // H
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    return seq, (pid % H).to(tl.int64), bos, eos, tl.load(first_ptr + seq).to(tl.int64), tl.cdiv(eos - bos, L)


@triton.jit
def _rows_of(pid_c, start_ptr, end_ptr, L: tl.constexpr, BT: tl.constexpr):
    """A per-row-block program's chunk, sub-block within it, the chunk's token span [t0, te) and
    its first row r0 (the block is empty where r0 >= te: a short last chunk)."""
    gc = (pid_c // (L // BT)).to(tl.int64)
    sub = pid_c % (L // BT)
    t0 = tl.load(start_ptr + gc)
    return gc, sub, t0, tl.load(end_ptr + gc), t0 + sub * BT


@triton.jit
def _chunk_tokens(start_ptr, end_ptr, L: tl.constexpr):
    """A per-chunk program's chunk gc and head h (program ids 1 and 2, int64: h * T_all and friends
    must not wrap), the chunk's first token t0, token offsets within it and which are inside it."""
    gc = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    t0 = tl.load(start_ptr + gc)
    ot = tl.arange(0, L)
    return gc, h, t0, ot, ot < tl.load(end_ptr + gc) - t0


@triton.jit
def _chunk_tile(t0, h, pid_k, ot, valid, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """The (L, BK) tile of a (T, H, K) tensor at a chunk's tokens and K slice pid_k: an int64 base,
    int32 offsets within the tile and its mask; the slice's columns and their mask."""
    ok = tl.arange(0, BK)
    mk = pid_k * BK + ok < K
    base = t0 * (H * K) + h * K + pid_k * BK
    return base, ot[:, None] * (H * K) + ok[None, :], valid[:, None] & mk[None, :], ok, mk


@triton.jit
def _chunk_decay(chs_ptr, gc, h, H: tl.constexpr, valid):
    """exp(g + m_start - m_end) of chunk(s) gc: how the state at its start counts at its end."""
    base = chs_ptr + (gc * H + h) * 3
    return tl.exp(tl.load(base + 1, mask=valid, other=0.0) + tl.load(base, mask=valid, other=0.0)
                  - tl.load(base + 2, mask=valid, other=0.0))


@triton.jit
def _chunk_gate_kernel(k_ptr, i_ptr, f_ptr, start_ptr, end_ptr, chs_ptr, tok_ptr, kw_ptr, ns_ptr, T_all,
                       H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    # Chunk-local gate work and the keys weighted for the state, fully parallel (the first launch
    # of a call does real work: a synchronous call's GPU idles until it is launched).
    # Per token b (cumulative log forget within the chunk) and cm (running max of i - b); per
    # chunk g (its total log forget) and a = g + max(i - b) (what its own inputs ask of the
    # stabiliser at its end). The keys are weighted against the chunk's own maximum,
    # k~ = k exp(i - b - max(i - b)) <= 1 in the operand dtype, with their fp32 sum (n's term) in
    # the chunk's n slot; the state kernel scales both by exp(a - m_end) once m_end is known.
    pid_k = tl.program_id(0)
    gc, h, t0, ot, valid = _chunk_tokens(start_ptr, end_ptr, L)
    fg = tl.load(f_ptr + (t0 * H + h) + ot * H, mask=valid, other=0.0).to(tl.float32)
    ig = tl.load(i_ptr + (t0 * H + h) + ot * H, mask=valid, other=0.0).to(tl.float32)
    lf = tl.where(valid, _logsigmoid(fg), 0.0)
    b = tl.cumsum(lf, 0)
    ib = tl.where(valid, ig - b, float("-inf"))
    cmax = tl.max(ib, 0)
    if pid_k == 0:
        g = tl.sum(lf, 0)
        tl.store(tok_ptr + (h * T_all + t0) + ot, b, mask=valid)
        tl.store(tok_ptr + ((3 * H + h) * T_all + t0) + ot, tl.associative_scan(ib, 0, _max_fn), mask=valid)
        tl.store(chs_ptr + (gc * H + h) * 3 + 1, g)
        tl.store(chs_ptr + (gc * H + h) * 3 + 2, g + cmax)
    w = tl.where(valid, tl.exp(ib - cmax), 0.0)
    base, off, msk, ok, mk = _chunk_tile(t0, h, pid_k, ot, valid, H, K, BK)
    kw = tl.load(k_ptr + base + off, mask=msk, other=0.0).to(tl.float32) * w[:, None]
    tl.store(kw_ptr + base + off, kw.to(kw_ptr.dtype.element_ty), mask=msk)
    tl.store(ns_ptr + (gc * H + h) * K + pid_k * BK + ok, tl.sum(kw, 0), mask=mk)


@triton.jit
def _key_scale(chs_ptr, tok_ptr, gc, h, te, H: tl.constexpr, T_all):
    """exp(a - m_end) of chunk gc (last token te - 1): the gate kernel weights the keys against the
    chunk's own a = g + max(i - b), the state kernel keeps C against m_end = max(m_start + g, a)."""
    base = chs_ptr + (gc * H + h) * 3
    cmax = tl.load(tok_ptr + (3 * H + h) * T_all + te - 1)   # the running max at the chunk's last token
    return tl.exp(tl.load(base + 1) + cmax - tl.load(base + 2))


@triton.jit
def _stab_combine(g1, a1, g2, a2):
    # m -> max(m + g, a), composed: first (g1, a1), then (g2, a2)
    return g1 + g2, tl.maximum(a1 + g2, a2)


@triton.jit
def _chunk_stab_kernel(m0_ptr, cu_ptr, first_ptr, chs_ptr, mt_ptr, H: tl.constexpr, L: tl.constexpr,
                       BLOCK: tl.constexpr, INIT: tl.constexpr):
    # The stabiliser across chunks, m_end = max(m_start + g, a), as a scan over BLOCK chunks at a
    # time (a max-plus recurrence is associative): writes m_start and m_end of every chunk (m_end
    # over the slot that held a) and the final m.
    seq, h, bos, eos, first, n_chunks = _sequence_of(tl.program_id(0), cu_ptr, first_ptr, H, L)
    m = tl.zeros([1], dtype=tl.float32).sum(0)            # no initial state: m0 = 0
    if INIT:
        m = tl.load(m0_ptr + seq * H + h).to(tl.float32)
    if n_chunks > 0:
        tl.store(chs_ptr + (first * H + h) * 3, m)
    for j0 in range(0, n_chunks, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < n_chunks
        slot = chs_ptr + ((first + j) * H + h) * 3
        g = tl.load(slot + 1, mask=ok, other=0.0)
        a = tl.load(slot + 2, mask=ok, other=float("-inf"))
        gs, as_ = tl.associative_scan((g, a), 0, _stab_combine)
        m_end = tl.maximum(m + gs, as_)
        tl.store(slot + 2, m_end, mask=ok)
        tl.store(slot + H * 3, m_end, mask=j + 1 < n_chunks)   # the next chunk's m_start
        # past the last chunk (g, a) = (0, -inf) leaves the scan unchanged: the last lane holds m
        m = tl.max(tl.where(j == j0 + BLOCK - 1, m_end, float("-inf")), 0)
    tl.store(mt_ptr + seq * H + h, m)


@triton.jit
def _state_kernel(
    kw_ptr, v_ptr, c0_ptr, n0_ptr, cu_ptr, first_ptr, chs_ptr, tok_ptr, cs_ptr, ns_ptr, ct_ptr, nt_ptr, T_all,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, INIT: tl.constexpr,
):
    # One program walks all chunks of one sequence and head for a BK x BV tile of C (n by the
    # pid_v == 0 programs), in fp32 registers: C <- decay C + k~^T V. With the gate work done
    # before (k~ and n's term per chunk), the loop is loads and one dot, and C is the only
    # dependence carried from chunk to chunk.
    # 64-bit scalar bases, 32-bit offsets inside a tile: keeps per-element address registers low.
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    seq, h, bos, eos, first, n_chunks = _sequence_of(tl.program_id(2), cu_ptr, first_ptr, H, L)

    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mk = pid_k * BK + ok < K
    mv = pid_v * BV + ov < V
    mkv = mk[:, None] & mv[None, :]
    ot = tl.arange(0, L)
    kv_off = ok[:, None] * V + ov[None, :]
    state_off = (seq * H + h).to(tl.int64)
    c_tile = pid_k * BK * V + pid_v * BV
    if INIT:
        c = tl.load(c0_ptr + state_off * K * V + c_tile + kv_off, mask=mkv, other=0.0).to(tl.float32)
        n = tl.load(n0_ptr + state_off * K + pid_k * BK + ok, mask=mk, other=0.0).to(tl.float32)
    else:                                                 # no initial state: zeros, never materialised
        c = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)
    k_off = ok[:, None] + ot[None, :] * (H * K)          # k~ read transposed: (BK, L)
    v_off = ot[:, None] * (H * V) + ov[None, :]

    for j in range(0, n_chunks):
        gc = first + j
        cst = (gc * H + h) * K
        tl.store(cs_ptr + cst * V + c_tile + kv_off, c.to(cs_ptr.dtype.element_ty), mask=mkv)
        t0 = bos + j * L
        valid = ot < eos - t0
        decay = _chunk_decay(chs_ptr, gc, h, H, True)
        ks = _key_scale(chs_ptr, tok_ptr, gc, h, tl.minimum(t0 + L, eos), H, T_all)
        kt = tl.load(kw_ptr + t0 * (H * K) + h * K + pid_k * BK + k_off, mask=mk[:, None] & valid[None, :], other=0.0)
        vt = tl.load(v_ptr + t0 * (H * V) + h * V + pid_v * BV + v_off, mask=valid[:, None] & mv[None, :], other=0.0)
        c = c * decay + ks * tl.dot(kt, vt, input_precision=PREC)
        if pid_v == 0:
            dn = tl.load(ns_ptr + cst + pid_k * BK + ok, mask=mk, other=0.0)   # this chunk's own term
            tl.store(ns_ptr + cst + pid_k * BK + ok, n, mask=mk)
            n = n * decay + ks * dn

    tl.store(ct_ptr + state_off * K * V + c_tile + kv_off, c, mask=mkv)
    if pid_v == 0:
        tl.store(nt_ptr + state_off * K + pid_k * BK + ok, n, mask=mk)


@triton.jit
def _out_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, cs_ptr, ns_ptr, chs_ptr, tok_ptr, start_ptr, end_ptr, h_ptr, p_ptr,
    scale, eps, T_all, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    STORED_P: tl.constexpr,
):
    # STORED_P: _score_blocks_kernel has formed the gated score blocks, each token's m (tok slot
    # 1) and its row sum (slot 3); otherwise they are formed here, once per Dv tile.
    pid_v = tl.program_id(0)
    pid_c = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    gc, sub, t0, te, r0 = _rows_of(pid_c, start_ptr, end_ptr, L, BT)
    if r0 < te:
        ob = tl.arange(0, BT)
        vr = ob < te - r0
        ok = tl.arange(0, BK)
        ov = tl.arange(0, BV)
        mv = pid_v * BV + ov < V
        b_r = tl.load(tok_ptr + (h * T_all + r0) + ob, mask=vr, other=0.0)
        m_prev = tl.load(chs_ptr + (gc * H + h) * 3)
        if STORED_P:
            m_r = tl.load(tok_ptr + ((H + h) * T_all + r0) + ob, mask=vr, other=0.0)
        else:
            m_r = _token_stabiliser(tok_ptr, b_r, m_prev, h, r0, ob, vr, H, T_all)
        cst = (gc * H + h) * K
        q_base = q_ptr + r0 * (H * K) + h * K
        qk_off = ob[:, None] * (H * K) + ok[None, :]
        v_off = ob[:, None] * (H * V) + ov[None, :]
        c_base = cs_ptr + cst * V + pid_v * BV
        c_off = ok[:, None] * V + ov[None, :]

        acc = tl.zeros([BT, BV], dtype=tl.float32)
        qn = tl.zeros([BT], dtype=tl.float32)
        for kk in range(0, K, BK):
            mk = kk + ok < K
            qt = tl.load(q_base + kk + qk_off, mask=vr[:, None] & mk[None, :], other=0.0)
            ct = tl.load(c_base + kk * V + c_off, mask=mk[:, None] & mv[None, :], other=0.0)
            nt = tl.load(ns_ptr + cst + kk + ok, mask=mk, other=0.0)
            acc += tl.dot(qt, ct.to(qt.dtype), input_precision=PREC)
            qn += tl.sum(qt.to(tl.float32) * nt[None, :], 1)
        w0 = tl.exp(b_r + m_prev - m_r) * scale
        acc = acc * w0[:, None]
        ssum = qn * w0

        if STORED_P:
            ssum += tl.load(tok_ptr + ((3 * H + h) * T_all + r0) + ob, mask=vr, other=0.0)
            blk = p_ptr + ((gc * H + h) * L + sub * BT) * L + ob[:, None] * L + ob[None, :]
            for jb in range(0, sub + 1):
                c0 = t0 + jb * BT
                vc = ob < te - c0
                p = tl.load(blk + jb * BT)           # written for every valid row; zeros past the chunk's end
                vt = tl.load(v_ptr + c0 * (H * V) + h * V + pid_v * BV + v_off, mask=vc[:, None] & mv[None, :],
                             other=0.0)
                acc += tl.dot(p, vt, input_precision=PREC)
        else:
            for jb in range(0, sub + 1):
                c0 = t0 + jb * BT
                vc = ob < te - c0
                p = _score_block(q_base, k_ptr, i_ptr, tok_ptr, b_r, m_r, qk_off, ok, vr, r0, c0, te, h, ob,
                                 scale, T_all, H, K, BT, BK, PREC)
                ssum += tl.sum(p, 1)
                vt = tl.load(v_ptr + c0 * (H * V) + h * V + pid_v * BV + v_off, mask=vc[:, None] & mv[None, :],
                             other=0.0)
                acc += tl.dot(p.to(vt.dtype), vt, input_precision=PREC)

        den = tl.maximum(tl.abs(ssum), tl.exp(-m_r)) + eps
        out = acc / den[:, None]
        tl.store(h_ptr + r0 * (H * V) + h * V + pid_v * BV + v_off, out.to(h_ptr.dtype.element_ty),
                 mask=vr[:, None] & mv[None, :])
        if pid_v == 0:
            if not STORED_P:
                tl.store(tok_ptr + ((H + h) * T_all + r0) + ob, m_r, mask=vr)
            tl.store(tok_ptr + ((2 * H + h) * T_all + r0) + ob, ssum, mask=vr)


@triton.jit
def _token_stabiliser(tok_ptr, b_r, m_prev, h, r0, ob, vr, H: tl.constexpr, T_all):
    """Each token's m, from its chunk's start and the running max of i - b (tok slot 3)."""
    return b_r + tl.maximum(m_prev, tl.load(tok_ptr + ((3 * H + h) * T_all + r0) + ob, mask=vr, other=0.0))


@triton.jit
def _score_block(q_base, k_ptr, i_ptr, tok_ptr, b_r, m_r, qk_off, ok, vr, r0, c0, te, h, ob, scale, T_all,
                 H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """The gated scores of BT query rows (from r0) against the BT keys from c0, in fp32."""
    w = _intra_gates(tok_ptr, i_ptr, b_r, m_r, vr, r0, c0, te, h, ob, T_all, H)
    return _qk_block(q_base, k_ptr, qk_off, ok, vr, ob < te - c0, c0, h, H, K, BT, BK, PREC) * w * scale


@triton.jit
def _qk_block(q_base, k_ptr, qk_off, ok, vr, vc, c0, h, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
              BK: tl.constexpr, PREC: tl.constexpr):
    """q k^T of BT query rows (q_base: the first one's head) and the BT keys from c0, in fp32."""
    k_base = k_ptr + c0 * (H * K) + h * K
    s = tl.zeros([BT, BT], dtype=tl.float32)
    for kk in range(0, K, BK):
        mk = kk + ok < K
        qt = tl.load(q_base + kk + qk_off, mask=vr[:, None] & mk[None, :], other=0.0)
        kt = tl.load(k_base + kk + qk_off, mask=vc[:, None] & mk[None, :], other=0.0)
        s += tl.dot(qt, tl.trans(kt), input_precision=PREC)
    return s


@triton.jit
def _intra_gates(tok_ptr, i_ptr, b_r, m_r, vr, r0, c0, te, h, ob, T_all, H: tl.constexpr):
    """exp(b_t - b_s + i_s - m_t) for BT query rows t from r0 and BT keys s from c0 of one chunk;
    zero above the diagonal and on rows or keys past the chunk's end (where it could overflow)."""
    vc = ob < te - c0
    b_c = tl.load(tok_ptr + (h * T_all + c0) + ob, mask=vc, other=0.0)
    i_c = tl.load(i_ptr + (c0 * H + h) + ob * H, mask=vc, other=0.0).to(tl.float32)
    causal = ((c0 + ob)[None, :] <= (r0 + ob)[:, None]) & vr[:, None] & vc[None, :]
    return tl.where(causal, tl.exp(b_r[:, None] - b_c[None, :] + i_c[None, :] - m_r[:, None]), 0.0)


@triton.jit
def _score_blocks_kernel(q_ptr, k_ptr, i_ptr, chs_ptr, tok_ptr, start_ptr, end_ptr, p_ptr, scale, T_all,
                         H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                         PREC: tl.constexpr):
    # The output kernel's intra-chunk scores formed once (it would form them once per Dv tile):
    # per row block, the gated blocks at or before the diagonal in the operand dtype (the rounding
    # the P V dot gives them anyway), each token's m (tok slot 1) and the fp32 row sum of its
    # scores (slot 3, over the running max that m was built from: read first, same rows only).
    pid_c = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    gc, sub, t0, te, r0 = _rows_of(pid_c, start_ptr, end_ptr, L, BT)
    if r0 < te:
        ob = tl.arange(0, BT)
        vr = ob < te - r0
        ok = tl.arange(0, BK)
        b_r = tl.load(tok_ptr + (h * T_all + r0) + ob, mask=vr, other=0.0)
        m_r = _token_stabiliser(tok_ptr, b_r, tl.load(chs_ptr + (gc * H + h) * 3), h, r0, ob, vr, H, T_all)
        q_base = q_ptr + r0 * (H * K) + h * K
        qk_off = ob[:, None] * (H * K) + ok[None, :]
        blk = p_ptr + ((gc * H + h) * L + sub * BT) * L + ob[:, None] * L + ob[None, :]
        rows = tl.zeros([BT], dtype=tl.float32)
        for jb in range(0, sub + 1):
            p = _score_block(q_base, k_ptr, i_ptr, tok_ptr, b_r, m_r, qk_off, ok, vr, r0, t0 + jb * BT, te, h, ob,
                             scale, T_all, H, K, BT, BK, PREC)
            rows += tl.sum(p, 1)
            tl.store(blk + jb * BT, p.to(p_ptr.dtype.element_ty))
        tl.store(tok_ptr + ((H + h) * T_all + r0) + ob, m_r, mask=vr)
        tl.store(tok_ptr + ((3 * H + h) * T_all + r0) + ob, rows, mask=vr)
