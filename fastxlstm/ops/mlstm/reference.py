"""The oracle: the mLSTM recurrence and its stabilised quadratic parallel form, plain and exact.

Both forms follow the same stabiliser trajectory m_t = max(l_t + m_{t-1}, i_t) with m_0 from the
initial state (0 by default). The parallel form therefore includes the initial-state term
b_t + m_0 in its row maximum; a plain row maximum would shift m, and since eps is added after the
max that changes h by ~3e-7. Computation runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..state import MLSTMState, state_dtype


def mlstm(q, k, v, i, f, state: MLSTMState | None = None, *, chunk_size: int = 64,
          eps: float = 1e-6) -> tuple[torch.Tensor, MLSTMState]:
    """The recurrent loop over time (chunk_size is accepted for the common signature only)."""
    B, T, H, Dqk = q.shape
    state = _initial_state(q, v, state)
    hs = []
    for t in range(T):
        h, state = mlstm_step(q[:, t], k[:, t], v[:, t], i[:, t], f[:, t], state, eps=eps)
        hs.append(h)
    return torch.stack(hs, dim=1), state


def mlstm_step(q, k, v, i, f, state: MLSTMState | None = None, *,
               eps: float = 1e-6) -> tuple[torch.Tensor, MLSTMState]:
    """One step. q, k: (B, H, Dqk); v: (B, H, Dv); i, f: (B, H). Returns h (B, H, Dv) and the new state."""
    out_dtype = q.dtype
    state = _initial_state(q.unsqueeze(1), v.unsqueeze(1), state)
    dt = state.c.dtype
    c, n, m = state
    q = q.to(dt) * q.shape[-1] ** -0.5                       # (B, H, Dqk)
    k, v, i, f = k.to(dt), v.to(dt), i.to(dt), f.to(dt)
    logf = F.logsigmoid(f)                                   # (B, H)
    m_new = torch.maximum(logf + m, i)
    fa = torch.exp(logf + m - m_new)
    ia = torch.exp(i - m_new)
    c_new = fa[..., None, None] * c + ia[..., None, None] * (k[..., :, None] * v[..., None, :])
    n_new = fa[..., None] * n + ia[..., None] * k
    num = torch.einsum("bhd,bhde->bhe", q, c_new)            # (B, H, Dv)
    den = torch.maximum((q * n_new).sum(-1).abs(), torch.exp(-m_new)) + eps
    h = num / den[..., None]
    return h.to(out_dtype), MLSTMState(c_new, n_new, m_new)


def mlstm_parallel(q, k, v, i, f, state: MLSTMState | None = None, *,
                   eps: float = 1e-6) -> tuple[torch.Tensor, MLSTMState]:
    """The stabilised quadratic form over the whole sequence, with initial and final state."""
    B, T, H, Dqk = q.shape
    out_dtype = q.dtype
    c0, n0, m0 = _initial_state(q, v, state)
    dt = c0.dtype
    q = q.to(dt).transpose(1, 2) * Dqk ** -0.5               # (B, H, T, Dqk)
    k = k.to(dt).transpose(1, 2)                             # (B, H, T, Dqk)
    v = v.to(dt).transpose(1, 2)                             # (B, H, T, Dv)
    i = i.to(dt).transpose(1, 2)                             # (B, H, T)
    b = torch.cumsum(F.logsigmoid(f.to(dt)).transpose(1, 2), dim=-1)   # (B, H, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    log_d = (b[..., :, None] - b[..., None, :] + i[..., None, :]).masked_fill(~causal, float("-inf"))
    log_init = b + m0[..., None]                             # (B, H, T): weight of the initial state
    m = torch.maximum(log_d.amax(-1), log_init)              # (B, H, T)
    s = (q @ k.transpose(-1, -2)) * torch.exp(log_d - m[..., None])
    w_init = torch.exp(log_init - m)
    num = s @ v + w_init[..., None] * (q @ c0)
    den = torch.maximum((s.sum(-1) + w_init * (q @ n0[..., None]).squeeze(-1)).abs(), torch.exp(-m)) + eps
    h = (num / den[..., None]).transpose(1, 2).to(out_dtype)
    # final state: the same weights seen from the last position
    m_last = m[..., -1]
    w_last = torch.exp(b[..., -1:] - b + i - m_last[..., None])           # (B, H, T)
    w0 = torch.exp(b[..., -1] + m0 - m_last)
    c_last = w0[..., None, None] * c0 + (k * w_last[..., None]).transpose(-1, -2) @ v
    n_last = w0[..., None] * n0 + (k * w_last[..., None]).sum(-2)
    return h, MLSTMState(c_last, n_last, m_last)


def _initial_state(q, v, state: MLSTMState | None) -> MLSTMState:
    """Zeros when ``state`` is None; otherwise the given state cast to the state dtype."""
    dt = state_dtype(q, v, *(state or ()))
    if state is None:
        B, _, H, Dqk = q.shape
        return MLSTMState.zeros(B, H, Dqk, v.shape[-1], device=q.device, dtype=dt)
    return MLSTMState(*(t.to(dt) for t in state))
