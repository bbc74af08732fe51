"""sLSTM ops: entry points, input checks and the backend registry.

Layout (the sLSTM part of NOTATION in ``fastxlstm.ops``), chosen once:
    x       (B, T, H, 4, D)  gate pre-activations from the input (W x + b), gate order i, f, z, o;
                             per (b, t, h) the 4*D values are contiguous, so a layer producing
                             (B, T, 4*H*D) in head-major order reshapes with a free view.
    r       (H, D, 4, D)     per-head recurrent weights R[h, d_in, gate, d_out]:
                             pre[b, h, g, :] = x[b, t, h, g, :] + h_{t-1}[b, h, :] @ r[h, :, g, :]
    state   SLSTMState(c, n, m, h), each (B, H, D), float32 (float64 for float64 inputs)
    output  h (B, T, H, D) in x's dtype.

Update equations (every backend computes the same function, the same stabiliser included):
    l_t = logsigmoid(f~_t)              (forget_gate="sigmoid", the official default)
        = f~_t                          (forget_gate="exp")
    m_t = i~_t                          where n_{t-1} == 0 (per element: nothing stored yet)
        = max(i~_t, m_{t-1} + l_t)      otherwise
    i'  = exp(i~_t - m_t),   f' = exp(min(m_{t-1} + l_t - m_t, 0))
    c_t = f' c_{t-1} + i' tanh(z~_t),   n_t = f' n_{t-1} + i'
    h_t = sigmoid(o~_t) c_t / n_t       (no eps: n_t >= i' > 0 after the first step)
The initial state defaults to zeros (so the first step sets m = i~). The min(., 0) is a no-op
except at the n == 0 step, where it keeps f' <= 1 as the official cell's min(f', 1) does.
Gradients are exact (m included): every backend matches autograd through the reference.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from .. import Backend, resolve_backend
from ..state import SLSTMState

FORGET_GATES = ("sigmoid", "exp")

IMPLS: dict[Backend, str] = {
    Backend.REFERENCE: "reference",
    Backend.NATIVE: "native",
    Backend.TRITON: "triton",
}


def available() -> list[Backend]:
    """Backends whose module is part of this installation (Triton may still fail to import)."""
    return [b for b, name in IMPLS.items() if importlib.util.find_spec(f"{__name__}.{name}") is not None]


def get(backend: Backend) -> ModuleType:
    """Import a backend module lazily, so ``import fastxlstm`` never imports Triton."""
    if backend not in IMPLS:
        raise ValueError(f"backend {backend!r} has no sLSTM implementation; choose from {list(IMPLS)}")
    return importlib.import_module(f"{__name__}.{IMPLS[backend]}")


def slstm(x: torch.Tensor, r: torch.Tensor, state: SLSTMState | None = None, *,
          backend: Backend | str = Backend.NATIVE,
          forget_gate: str = "sigmoid") -> tuple[torch.Tensor, SLSTMState]:
    """Run the sLSTM cell over a sequence.

    Args:
        x: (B, T, H, 4, D) gate pre-activations (i, f, z, o), bias already added.
        r: (H, D, 4, D) recurrent weights.
        state: initial SLSTMState (c, n, m, h each (B, H, D)) or None for zeros. Never modified.
        backend: a concrete Backend (AUTO is resolved for the inputs' device).
        forget_gate: "sigmoid" (log f = logsigmoid(f~)) or "exp" (log f = f~).
    Returns:
        h: (B, T, H, D) in x's dtype; the final SLSTMState (float32, float64 for float64 inputs).
    """
    check_slstm_inputs(x, r, state, forget_gate)
    backend = resolve_backend(backend, x.device)
    return get(backend).slstm(x, r, state, forget_gate=forget_gate)


def slstm_step(x: torch.Tensor, r: torch.Tensor, state: SLSTMState | None = None, *,
               backend: Backend | str = Backend.NATIVE,
               forget_gate: str = "sigmoid") -> tuple[torch.Tensor, SLSTMState]:
    """One recurrent step. x: (B, H, 4, D); r: (H, D, 4, D). Returns h (B, H, D) and the new state."""
    check_slstm_inputs(x.unsqueeze(1), r, state, forget_gate)
    backend = resolve_backend(backend, x.device)
    return get(backend).slstm_step(x, r, state, forget_gate=forget_gate)


def check_slstm_inputs(x, r, state, forget_gate: str = "sigmoid") -> None:
    """Raise ValueError naming the offending argument when shapes or dtypes do not fit the layout."""
    for name, t in (("x", x), ("r", r)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if x.dim() != 5 or x.shape[3] != 4:
        raise ValueError(f"x must be (B, T, H, 4, D) with gates i, f, z, o; got shape {tuple(x.shape)}")
    B, T, H, _, D = x.shape
    if tuple(r.shape) != (H, D, 4, D):
        raise ValueError(f"r must be (H, D, 4, D) = {(H, D, 4, D)}, got {tuple(r.shape)}")
    if forget_gate not in FORGET_GATES:
        raise ValueError(f"forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}")
    if state is not None:
        if not isinstance(state, SLSTMState):
            raise TypeError(f"state must be an SLSTMState, got {type(state).__name__}")
        for name in SLSTMState._fields:
            t = getattr(state, name)
            if tuple(t.shape) != (B, H, D):
                raise ValueError(f"state.{name} must have shape {(B, H, D)}, got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"state.{name} must be floating point, got {t.dtype}")


def initial_state(x: torch.Tensor, r: torch.Tensor, state: SLSTMState | None) -> SLSTMState:
    """The given state cast to the compute dtype, or zeros. x: (B, T, H, 4, D)."""
    from ..state import state_dtype

    dt = state_dtype(x, r)
    if state is None:
        B, _, H, _, D = x.shape
        zeros = x.new_zeros(B, H, D, dtype=dt)
        return SLSTMState(zeros, zeros, zeros, zeros)
    return SLSTMState(*(t.to(dt) for t in state))
