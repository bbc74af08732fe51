"""Pure tensor ops for xLSTM cells. No nn.Module, no config objects, no torch.distributed.

NOTATION (one layout everywhere; checked at the op boundary)
-----------------------------------------------------------
B batch, T time, H heads, Dqk query/key head dim, Dv value head dim.

mLSTM inputs
    q, k        (B, T, H, Dqk)   any float dtype; q is scaled by Dqk**-0.5 inside the op
    v           (B, T, H, Dv)
    i, f        (B, T, H)        gate pre-activations: log input gate = i (exponential gate),
                                 log forget gate = logsigmoid(f)
mLSTM state     MLSTMState(c (B, H, Dqk, Dv), n (B, H, Dqk), m (B, H)), float32
                (float64 for float64 inputs), stabilised: true memory = c * exp(m).
Output h        (B, T, H, Dv) in the dtype of q.

Update equations (the recurrent form; every backend computes the same function and follows the
same stabiliser trajectory m_t, so they agree to rounding):
    l_t = logsigmoid(f_t)
    m_t = max(l_t + m_{t-1}, i_t)                     m_0 = 0
    c_t = exp(l_t + m_{t-1} - m_t) c_{t-1} + exp(i_t - m_t) k_t v_t^T
    n_t = exp(l_t + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
    h_t = (q~_t^T c_t) / (max(|q~_t . n_t|, exp(-m_t)) + eps)        q~ = q / sqrt(Dqk)

Layouts never change between backends; weights never depend on the backend.
"""

from __future__ import annotations

import enum
import functools
import logging

import torch

from .state import MLSTMState, SLSTMState

__all__ = ["Backend", "resolve_backend", "available_backends", "mlstm", "mlstm_step",
           "MLSTMState", "SLSTMState"]

log = logging.getLogger("fastxlstm")


class Backend(str, enum.Enum):
    """Which implementation runs the cell ops (a closed set; JSON and CLI friendly)."""

    AUTO = "auto"
    REFERENCE = "reference"
    NATIVE = "native"
    TRITON = "triton"

    def __str__(self) -> str:
        return self.value


# The subpackage ops/mlstm/ and the function ops.mlstm() share a name: import the package first under
# another name, so the function defined below is what ``fastxlstm.ops.mlstm`` means.
from . import mlstm as mlstm_impls  # noqa: E402


@functools.cache
def triton_available() -> bool:
    # a probe, not an import: Triton is imported only by the kernels in ops/*/triton/
    import importlib.util

    return importlib.util.find_spec("triton") is not None


# Triton's mLSTM module is part of this build and Triton is installed: probed once, here, without
# importing Triton. Compiled code reads this value; tracing the probes' import machinery broke the
# graph of every compiled block that called an op (1.3b training on the H200).
_TRITON_READY: bool = Backend.TRITON in mlstm_impls.available() and triton_available()


def resolve_backend(backend: Backend | str, device: torch.device | str | None = None, *,
                    chunk_size: int | None = None) -> Backend:
    """Turn AUTO into a concrete backend for ``device``; check that an explicit choice can run.

    AUTO picks Triton on CUDA when Triton imports and its kernels are registered (and run
    ``chunk_size``, where one is given: a power of two >= 16), native otherwise. A named backend
    that cannot run raises with the reason; there is never a silent fallback. Called outside
    compiled code (a model resolves its backend before its compiled blocks run), it also imports
    the backend's module, which compiled code then only looks up.
    """
    backend = Backend(backend)
    device = torch.device(device if device is not None else "cpu")
    if backend is Backend.AUTO:
        takes = chunk_size is None or mlstm_impls.triton_takes_chunk(chunk_size)
        backend = Backend.TRITON if device.type == "cuda" and _TRITON_READY and takes else Backend.NATIVE
    elif backend is Backend.TRITON and not _TRITON_READY:
        if Backend.TRITON not in mlstm_impls.available():
            raise RuntimeError("backend 'triton' is not part of this build of fastxlstm")
        raise RuntimeError("backend 'triton' needs Triton: pip install 'fastxlstm[triton]'")
    if not torch.compiler.is_compiling():
        mlstm_impls.get(backend)
    return backend


def available_backends() -> list[Backend]:
    """Concrete backends usable on this machine (Triton on the CPU only via TRITON_INTERPRET=1)."""
    return [b for b in mlstm_impls.available() if b is not Backend.TRITON or triton_available()]


def mlstm(q, k, v, i, f, state: MLSTMState | None = None, *, backend: Backend | str = Backend.NATIVE,
          chunk_size: int = 64, eps: float = 1e-6,
          cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, MLSTMState]:
    """Run the mLSTM cell over a sequence.

    Args:
        q, k: (B, T, H, Dqk); v: (B, T, H, Dv); i, f: (B, T, H) gate pre-activations.
        state: initial MLSTMState or None for zeros. Never modified.
        backend: a concrete Backend (AUTO is resolved for the inputs' device).
        chunk_size: chunk length for chunkwise backends (any T is accepted).
        eps: added to the denominator after the max.
        cu_seqlens: packed documents: B must be 1 and q ... f hold N documents one after another
            along T; cu_seqlens (N + 1,) integer offsets from 0 to T. Every document starts from
            its own state (zeros, or ``state`` with batch N) exactly as if run alone.
    Returns:
        h: (B, T, H, Dv) in q's dtype; the final MLSTMState (float32, float64 for float64 inputs),
        with batch N (one per document) when cu_seqlens is given.
    """
    backend = resolve_backend(backend, q.device)
    if cu_seqlens is None:
        check_mlstm_inputs(q, k, v, i, f, state, chunk_size=chunk_size)
        return mlstm_impls.get(backend).mlstm(q, k, v, i, f, state, chunk_size=chunk_size, eps=eps)
    # Eager even inside compiled code: the document offsets are data read on the host, and Inductor
    # failed on the per-document work traced from them (an AssertionError or a corrupted heap on the
    # CPU, torch 2.13). Not a decorator: torch.compiler.disable loads Dynamo, and with it Triton.
    packed = torch.compiler.disable(_packed_mlstm) if torch.compiler.is_compiling() else _packed_mlstm
    return packed(q, k, v, i, f, state, backend, chunk_size, eps, cu_seqlens)


def _packed_mlstm(q, k, v, i, f, state, backend, chunk_size, eps, cu_seqlens):
    check_mlstm_inputs(q, k, v, i, f, None, chunk_size=chunk_size)
    n_docs = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    if state is not None:
        first = slice(0, 1)
        check_mlstm_inputs(q, k, v, i, f, MLSTMState(state.c[first], state.n[first], state.m[first]))
        if not all(t.shape[0] == n_docs for t in state):
            raise ValueError(f"with cu_seqlens the state must have batch {n_docs} (one per document), "
                             f"got {[tuple(t.shape) for t in state]}")
    if backend is Backend.REFERENCE:
        from .mlstm import native, reference

        return native.per_document(reference.mlstm, q, k, v, i, f, state, cu_seqlens, chunk_size=chunk_size, eps=eps)
    return mlstm_impls.get(backend).mlstm(q, k, v, i, f, state, chunk_size=chunk_size, eps=eps,
                                          cu_seqlens=cu_seqlens)


def mlstm_step(q, k, v, i, f, state: MLSTMState | None = None, *,
               backend: Backend | str = Backend.NATIVE, eps: float = 1e-6) -> tuple[torch.Tensor, MLSTMState]:
    """One recurrent step.

    Args:
        q, k: (B, H, Dqk); v: (B, H, Dv); i, f: (B, H); state: MLSTMState or None for zeros.
    Returns:
        h: (B, H, Dv) in q's dtype and the new MLSTMState (new tensors; the input is untouched).
    """
    check_mlstm_inputs(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), i.unsqueeze(1), f.unsqueeze(1), state)
    backend = resolve_backend(backend, q.device)
    return mlstm_impls.get(backend).mlstm_step(q, k, v, i, f, state, eps=eps)


def check_cu_seqlens(cu_seqlens, batch: int, length: int) -> int:
    """Raise ValueError unless cu_seqlens is (N + 1,) integer offsets from 0 to T, non-decreasing,
    for a batch of one. Returns N, the number of documents."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor of N + 1 >= 2 offsets")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
        raise ValueError(f"cu_seqlens must be integer, got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the inputs must be one packed sequence (B=1), got B={batch}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != length or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={length} without decreasing, got {cu}")
    return len(cu) - 1


def check_mlstm_inputs(q, k, v, i, f, state, *, chunk_size: int = 64) -> None:
    """Raise ValueError naming the offending argument when shapes or dtypes do not fit NOTATION."""
    for name, t in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, Dqk), got shape {tuple(q.shape)}")
    B, T, H, Dqk = q.shape
    if tuple(k.shape) != (B, T, H, Dqk):
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be (B, T, H, Dv) = ({B}, {T}, {H}, Dv), got {tuple(v.shape)}")
    for name, g in (("i", i), ("f", f)):
        if tuple(g.shape) != (B, T, H):
            raise ValueError(f"{name} must be (B, T, H) = {(B, T, H)}, got {tuple(g.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if state is not None:
        Dv = v.shape[-1]
        expected = {"c": (B, H, Dqk, Dv), "n": (B, H, Dqk), "m": (B, H)}
        for name, shape in expected.items():
            t = getattr(state, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"state.{name} must have shape {shape} for these inputs, got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"state.{name} must be floating point, got {t.dtype}")


from .slstm import slstm, slstm_step  # noqa: E402  sLSTM layout and equations: ops/slstm/__init__.py
__all__ += ["slstm", "slstm_step"]
