"""The oracle: the sLSTM recurrence as a plain time loop, differentiated by autograd.

Computation runs in float32 (float64 for float64 inputs); h is returned in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..state import SLSTMState
from . import initial_state


def slstm(x, r, state: SLSTMState | None = None, *,
          forget_gate: str = "sigmoid") -> tuple[torch.Tensor, SLSTMState]:
    """x: (B, T, H, 4, D); r: (H, D, 4, D). Returns h (B, T, H, D) and the final state."""
    state = initial_state(x, r, state)
    hs = []
    for t in range(x.shape[1]):
        h, state = slstm_step(x[:, t], r, state, forget_gate=forget_gate)
        hs.append(h)
    if not hs:
        return x.new_zeros(x.shape[0], 0, x.shape[2], x.shape[4]), state
    return torch.stack(hs, dim=1), state


def slstm_step(x, r, state: SLSTMState | None = None, *,
               forget_gate: str = "sigmoid") -> tuple[torch.Tensor, SLSTMState]:
    """One step. x: (B, H, 4, D); r: (H, D, 4, D). Returns h (B, H, D) and the new state."""
    out_dtype = x.dtype
    c, n, m, h = initial_state(x.unsqueeze(1), r, state)
    dt = c.dtype
    pre = x.to(dt) + torch.einsum("bhd,hdge->bhge", h, r.to(dt))   # (B, H, 4, D)
    i, f, z, o = pre.unbind(dim=2)
    logf = F.logsigmoid(f) if forget_gate == "sigmoid" else f
    m_new = torch.where(n == 0, i, torch.maximum(i, m + logf))
    ig = torch.exp(i - m_new)
    fg = torch.exp(torch.clamp(m + logf - m_new, max=0.0))
    c_new = fg * c + ig * torch.tanh(z)
    n_new = fg * n + ig
    h_new = torch.sigmoid(o) * c_new / n_new
    return h_new.to(out_dtype), SLSTMState(c_new, n_new, m_new, h_new)
