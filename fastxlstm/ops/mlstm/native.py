"""Chunkwise mLSTM in plain PyTorch (autograd for the backward); runs anywhere, the CPU included.

The sequence is cut into T // L whole chunks, computed together, and one shorter tail chunk of
T % L steps, computed with the same code: exact for any T, with no padding. Inside a chunk the
output mixes the chunk-start state (inter-chunk) with a causal L x L quadratic form (intra-chunk).
The stabiliser is the recurrent one, written in closed form for step t of a chunk:
    m_t = max(b_t + m_prev, max_{j<=t} (b_t - b_j + i_j)),   b = cumsum of logsigmoid(f) in the chunk,
so every exponent below is <= 0 and the result matches the recurrent loop to rounding.
Inputs are computed in float32 (float64 stays float64); h is returned in q's dtype. No tensor
passed in is modified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..state import MLSTMState
from .reference import _initial_state
from .reference import mlstm_step as _reference_step


def mlstm(q, k, v, i, f, state: MLSTMState | None = None, *, chunk_size: int = 64,
          eps: float = 1e-6, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise forward over any T; same contract as ``reference.mlstm``. With ``cu_seqlens``
    (packed documents, B = 1) each document runs on its own: see ``per_document``."""
    if cu_seqlens is not None:
        return per_document(mlstm, q, k, v, i, f, state, cu_seqlens, chunk_size=chunk_size, eps=eps)
    B, T, H, Dqk = q.shape
    out_dtype = q.dtype
    state = _initial_state(q, v, state)
    dt = state.c.dtype
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    q = q * Dqk ** -0.5
    bulk = T - T % chunk_size
    outs = []
    for start, stop, L in ((0, bulk, chunk_size), (bulk, T, T - bulk)):
        if stop > start:
            h, state = _chunks(*(_to_chunks(t[:, start:stop], L) for t in (q, k, v, i, f)), state, eps)
            outs.append(h)
    if not outs:
        return q.new_zeros(B, 0, H, v.shape[-1], dtype=out_dtype), state
    return torch.cat(outs, dim=1).to(out_dtype), state


def per_document(fn, q, k, v, i, f, state: MLSTMState | None, cu_seqlens: torch.Tensor, **kw
                 ) -> tuple[torch.Tensor, MLSTMState]:
    """Run ``fn`` on each packed document [cu[n], cu[n+1]) from its own initial state (zeros, or
    row n of ``state``): exact by construction, one call per document. Returns h (1, T, H, Dv)
    and the final states stacked to batch N."""
    H, Dv = q.shape[2], v.shape[-1]
    cu = cu_seqlens.tolist()
    hs, finals = [], []
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        s0 = None if state is None else MLSTMState(*(t[n:n + 1] for t in state))
        if b == a:
            hs.append(q.new_zeros(1, 0, H, Dv))
            finals.append(_initial_state(q, v, s0))
            continue
        h, s = fn(*(x[:, a:b] for x in (q, k, v, i, f)), s0, **kw)
        hs.append(h)
        finals.append(s)
    return torch.cat(hs, dim=1), MLSTMState(*(torch.cat(parts, dim=0) for parts in zip(*finals)))


def mlstm_step(q, k, v, i, f, state: MLSTMState | None = None, *,
               eps: float = 1e-6) -> tuple[torch.Tensor, MLSTMState]:
    """One recurrent step: the single-step formula is the reference's (one formula, one place)."""
    return _reference_step(q, k, v, i, f, state, eps=eps)


def _to_chunks(t: torch.Tensor, L: int) -> torch.Tensor:
    """(B, N*L, H, ...) -> (B, H, N, L, ...)."""
    B, T, H = t.shape[:3]
    t = t.reshape(B, T // L, L, H, *t.shape[3:])
    return t.movedim(3, 1)


def _chunks(q, k, v, i, f, state: MLSTMState, eps: float) -> tuple[torch.Tensor, MLSTMState]:
    """q, k: (B, H, N, L, Dqk); v: (B, H, N, L, Dv); i, f: (B, H, N, L); q already scaled."""
    B, H, N, L, Dqk = q.shape
    b = torch.cumsum(F.logsigmoid(f), dim=-1)               # (B, H, N, L)
    g = b[..., -1]                                           # (B, H, N): log decay over a chunk
    a = g[..., None] - b + i                                 # (B, H, N, L): log weight of step j at chunk end
    a_max = a.amax(-1)                                       # (B, H, N)
    kw = k * torch.exp(a - a_max[..., None])[..., None]      # (B, H, N, L, Dqk)
    dc = kw.transpose(-1, -2) @ v                            # (B, H, N, Dqk, Dv)
    dn = kw.sum(-2)                                          # (B, H, N, Dqk)

    # inter-chunk recurrence: the states at every chunk start, then the final state
    c, n, m = state
    starts_c, starts_n, starts_m = [], [], []
    for j in range(N):
        starts_c.append(c)
        starts_n.append(n)
        starts_m.append(m)
        m_new = torch.maximum(g[..., j] + m, a_max[..., j])
        decay = torch.exp(g[..., j] + m - m_new)
        scale = torch.exp(a_max[..., j] - m_new)
        c = decay[..., None, None] * c + scale[..., None, None] * dc[:, :, j]
        n = decay[..., None] * n + scale[..., None] * dn[:, :, j]
        m = m_new
    c_prev = torch.stack(starts_c, dim=2)                    # (B, H, N, Dqk, Dv)
    n_prev = torch.stack(starts_n, dim=2)                    # (B, H, N, Dqk)
    m_prev = torch.stack(starts_m, dim=2)                    # (B, H, N)

    # intra-chunk quadratic form plus the chunk-start state's contribution
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    log_d = (b[..., :, None] - b[..., None, :] + i[..., None, :]).masked_fill(~causal, float("-inf"))
    log_init = b + m_prev[..., None]                         # (B, H, N, L)
    m_t = torch.maximum(log_d.amax(-1), log_init)            # (B, H, N, L)
    s = (q @ k.transpose(-1, -2)) * torch.exp(log_d - m_t[..., None])
    w_init = torch.exp(log_init - m_t)
    num = s @ v + w_init[..., None] * (q @ c_prev)
    qn = (q @ n_prev[..., None]).squeeze(-1)                 # (B, H, N, L)
    den = torch.maximum((s.sum(-1) + w_init * qn).abs(), torch.exp(-m_t)) + eps
    h = num / den[..., None]                                 # (B, H, N, L, Dv)
    h = h.movedim(1, 3).reshape(B, N * L, H, -1)             # (B, N*L, H, Dv)
    return h, MLSTMState(c, n, m)
