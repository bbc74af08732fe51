"""Fused single-token mLSTM step for decoding.

_step_kernel   grid (cdiv(Dv, BV), B * H). One program owns a Dqk x BV slice of C for one sequence
               and head, walks Dqk in BK tiles: C' = fa C + ia k v^T (fp32), accumulates q~ C' and
               q~ . n' (n' is recomputed by every program from the old n, written by pid_v == 0
               only), then h = q~ C' / (max(|q~ n'|, exp(-m')) + eps). No backward: decoding only.
               C may be updated in place (each element is read and written by the same program);
               n and m are read by every program, so in-place callers get them through fresh
               buffers copied back after the launch. No host synchronisation: CUDA-graph capturable.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fwd import _logsigmoid


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, c_ptr, n_ptr, m_ptr, c_out, n_out, m_out, h_ptr,
    scale, eps, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    ov = pid_v * BV + tl.arange(0, BV)
    mv = ov < V
    ig = tl.load(i_ptr + bh).to(tl.float32)
    lf = _logsigmoid(tl.load(f_ptr + bh).to(tl.float32))
    m = tl.load(m_ptr + bh)
    m_new = tl.maximum(lf + m, ig)
    fa = tl.exp(lf + m - m_new)
    ia = tl.exp(ig - m_new)
    vt = tl.load(v_ptr + bh * V + ov, mask=mv, other=0.0).to(tl.float32)
    num = tl.zeros([BV], dtype=tl.float32)
    qn = tl.zeros([BK], dtype=tl.float32)
    for kk in range(0, K, BK):
        ok = kk + tl.arange(0, BK)
        mk = ok < K
        qt = tl.load(q_ptr + bh * K + ok, mask=mk, other=0.0).to(tl.float32) * scale
        kt = tl.load(k_ptr + bh * K + ok, mask=mk, other=0.0).to(tl.float32)
        off = bh * K * V + ok[:, None] * V + ov[None, :]
        msk = mk[:, None] & mv[None, :]
        c = tl.load(c_ptr + off, mask=msk, other=0.0) * fa + ia * kt[:, None] * vt[None, :]
        tl.store(c_out + off, c, mask=msk)
        num += tl.sum(qt[:, None] * c, 0)
        n = tl.load(n_ptr + bh * K + ok, mask=mk, other=0.0) * fa + ia * kt
        qn += qt * n
        if pid_v == 0:
            tl.store(n_out + bh * K + ok, n, mask=mk)
    den = tl.maximum(tl.abs(tl.sum(qn, 0)), tl.exp(-m_new)) + eps
    tl.store(h_ptr + bh * V + ov, (num / den).to(h_ptr.dtype.element_ty), mask=mv)
    if pid_v == 0:
        tl.store(m_out + bh, m_new)
