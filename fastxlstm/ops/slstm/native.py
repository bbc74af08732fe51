"""sLSTM in plain PyTorch with a hand-written backward (a torch.autograd.Function).

The recurrence is nonlinear, so time stays a loop; what makes this the fast pure-PyTorch form is
that the forward runs without building an autograd graph (one batched matmul per step for all
heads and gates), saves the per-step pre-activations and states, and the backward walks time
once in reverse. The recurrent-weight gradient is then one large matmul over all (b, t), outside
the loop. The same saved tensors and the same backward equations drive the Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..state import SLSTMState
from . import initial_state
from .reference import slstm_step as _reference_step


def slstm(x, r, state: SLSTMState | None = None, *,
          forget_gate: str = "sigmoid") -> tuple[torch.Tensor, SLSTMState]:
    """Same contract as ``reference.slstm``."""
    s0 = initial_state(x, r, state)
    h, c, n, m, hT = _SLSTM.apply(x, r, *s0, forget_gate == "exp")
    return h, SLSTMState(c, n, m, hT)


def slstm_step(x, r, state: SLSTMState | None = None, *,
               forget_gate: str = "sigmoid") -> tuple[torch.Tensor, SLSTMState]:
    """One step: the single-step formula is the reference's (one formula, one place)."""
    return _reference_step(x, r, state, forget_gate=forget_gate)


class _SLSTM(torch.autograd.Function):
    # The loop runs head-major, (H, B, ...), so each step's recurrent matmul is one bmm over heads
    # with no per-step transposes; inputs and outputs are permuted once, outside the loop.
    @staticmethod
    def forward(ctx, x, r, c0, n0, m0, h0, forget_exp: bool):
        B, T, H, _, D = x.shape
        dt = c0.dtype
        rr = r.to(dt).reshape(H, D, 4 * D)
        xt = x.to(dt).permute(1, 2, 0, 3, 4).contiguous()                # (T, H, B, 4, D)
        pre_all = torch.empty_like(xt)
        c_all, n_all, m_all, h_all = (xt.new_empty(T, H, B, D) for _ in range(4))
        c, n, m, h = (s.transpose(0, 1) for s in (c0, n0, m0, h0))       # (H, B, D)
        for t in range(T):
            pre = torch.baddbmm(xt[t].view(H, B, 4 * D), h, rr).view(H, B, 4, D)
            c, n, m, h = pointwise_forward(pre, c, n, m, forget_exp)
            pre_all[t], c_all[t], n_all[t], m_all[t], h_all[t] = pre, c, n, m, h
        ctx.save_for_backward(r, pre_all, c_all, n_all, m_all, h_all, c0, n0, m0, h0)
        ctx.forget_exp, ctx.x_dtype = forget_exp, x.dtype
        final = (c.transpose(0, 1).contiguous(), n.transpose(0, 1).contiguous(), m.transpose(0, 1).contiguous(),
                 h.transpose(0, 1).contiguous())
        return (h_all.permute(2, 0, 1, 3).to(x.dtype).contiguous(), *final)

    @staticmethod
    def backward(ctx, dh_all, dcT, dnT, dmT, dhT):
        r, pre_all, c_all, n_all, m_all, h_all, c0, n0, m0, h0 = ctx.saved_tensors
        T, H, B, _, D = pre_all.shape
        dt = c0.dtype
        rt = r.to(dt).reshape(H, D, 4 * D).transpose(1, 2)            # (H, 4D, D)
        dpre_all = torch.empty_like(pre_all)
        zero = c0.new_zeros(H, B, D)
        dc, dn, dm, dh_rec = (g.to(dt).transpose(0, 1) if g is not None else zero for g in (dcT, dnT, dmT, dhT))
        dh_all = (dh_all.to(dt).permute(1, 2, 0, 3) if dh_all is not None else pre_all.new_zeros(T, H, B, D))
        init = tuple(s.transpose(0, 1) for s in (c0, n0, m0))
        for t in range(T - 1, -1, -1):
            prev = (c_all[t - 1], n_all[t - 1], m_all[t - 1]) if t > 0 else init
            dpre, dc, dn, dm = pointwise_backward(
                pre_all[t], c_all[t], n_all[t], m_all[t], *prev,
                dh_all[t] + dh_rec, dc, dn, dm, ctx.forget_exp)
            dpre_all[t] = dpre
            dh_rec = torch.bmm(dpre.view(H, B, 4 * D), rt)                # (H, B, D)
        h_prev = torch.cat([h0.transpose(0, 1)[None], h_all[:-1]], dim=0)  # (T, H, B, D)
        dr = torch.bmm(h_prev.permute(1, 3, 0, 2).reshape(H, D, T * B),
                       dpre_all.permute(1, 0, 2, 3, 4).reshape(H, T * B, 4 * D))
        dx = dpre_all.permute(2, 0, 1, 3, 4).to(ctx.x_dtype)
        grads = (dc, dn, dm, dh_rec)
        return (dx, dr.view(H, D, 4, D).to(r.dtype), *(g.transpose(0, 1) for g in grads), None)


def pointwise_forward(pre, c, n, m, forget_exp: bool):
    """One step's gates and state update from the full pre-activations pre: (B, H, 4, D)."""
    i, f, z, o = pre.unbind(dim=2)
    logf = f if forget_exp else F.logsigmoid(f)
    m_new = torch.where(n == 0, i, torch.maximum(i, m + logf))
    ig = torch.exp(i - m_new)
    fg = torch.exp(torch.clamp(m + logf - m_new, max=0.0))
    c_new = fg * c + ig * torch.tanh(z)
    n_new = fg * n + ig
    return c_new, n_new, m_new, torch.sigmoid(o) * c_new / n_new


def pointwise_backward(pre, c, n, m, c_p, n_p, m_p, dh, dc, dn, dm, forget_exp: bool):
    """Gradients of one step. dc, dn, dm arrive from later steps; returns dpre and those of step t-1.

    m_t enters c_t and n_t only through the exponents (i - m_t) and (m_{t-1} + l - m_t), so its
    total gradient is dm - dig - dfg; the max then routes it to i or to (m_{t-1}, l).
    """
    i, f, z, o = pre.unbind(dim=2)
    so = torch.sigmoid(o)
    tz = torch.tanh(z)
    logf = f if forget_exp else F.logsigmoid(f)
    fexp = m_p + logf - m
    fg = torch.exp(torch.clamp(fexp, max=0.0))
    ig = torch.exp(i - m)
    inv_n = 1.0 / n
    do = dh * c * inv_n * so * (1 - so)
    dc = dc + dh * so * inv_n
    dn = dn - dh * so * c * inv_n * inv_n
    dz = dc * ig * (1 - tz * tz)
    dig = (dc * tz + dn) * ig
    dfg = torch.where(fexp <= 0, (dc * c_p + dn * n_p) * fg, torch.zeros_like(fg))
    dm_total = dm - dig - dfg
    to_i = (n_p == 0) | (i >= m_p + logf)
    di = dig + torch.where(to_i, dm_total, torch.zeros_like(dm_total))
    dlogf = dfg + torch.where(to_i, torch.zeros_like(dm_total), dm_total)
    df = dlogf if forget_exp else dlogf * torch.sigmoid(-f)
    return torch.stack((di, df, dz, do), dim=2), dc * fg, dn * fg, dlogf
