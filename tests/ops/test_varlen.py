"""Packed variable-length batches (cu_seqlens): every backend against the reference run on each
document alone, forward, final states and gradients (initial states included)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastxlstm import ops  # noqa: E402
from fastxlstm.ops import Backend, MLSTMState  # noqa: E402
from fastxlstm.ops.mlstm import reference  # noqa: E402
from tests.helpers import assert_close, make_mlstm_inputs  # noqa: E402

# Documents shorter than, equal to and longer than a chunk, one empty, boundaries off the chunk grid.
CU = [0, 5, 5, 21, 22, 60]


def per_doc_reference(xs, state, cu):
    """The oracle: each document through reference.mlstm on its own."""
    hs, finals = [], []
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        s0 = None if state is None else MLSTMState(*(t[n:n + 1] for t in state))
        if b == a:  # an empty document passes its initial state through
            H, K, V = xs[0].shape[2], xs[0].shape[3], xs[2].shape[3]
            hs.append(xs[2][:, :0])
            finals.append(s0 or MLSTMState.zeros(1, H, K, V, dtype=torch.float64, device=xs[0].device))
            continue
        h, s = reference.mlstm(*(x[:, a:b] for x in xs), s0)
        hs.append(h)
        finals.append(s)
    return torch.cat(hs, 1), MLSTMState(*(torch.cat(p, 0) for p in zip(*finals)))


def run_case(backend, dtype, with_state, device="cpu"):
    T, H, K, V = CU[-1], 2, 16, 16
    N = len(CU) - 1
    (q, k, v, i, f), _ = make_mlstm_inputs(1, T, H, K, V, dtype=dtype, device=device)
    state = make_mlstm_inputs(N, 1, H, K, V, dtype=dtype, device=device, with_state=True)[1] if with_state else None
    x = [q, k, v, i, f] + (list(state) if with_state else [])
    x = [t.detach().requires_grad_(True) for t in x]
    x64 = [t.detach().double().requires_grad_(True) for t in x]
    dh = torch.randn(1, T, H, V, dtype=torch.float64, device=device)
    ds = [torch.randn(s, dtype=torch.float64, device=device) for s in ((N, H, K, V), (N, H, K), (N, H))]

    def run(fn, xs):
        h, s = fn(xs[:5], MLSTMState(*xs[5:]) if with_state else None)
        loss = (h.double() * dh).sum() + sum((a.double() * b).sum() for a, b in zip(s, ds))
        return h, s, torch.autograd.grad(loss, xs)

    cu = torch.tensor(CU, device=device)
    ref = run(lambda xs, st: per_doc_reference(xs, st, CU), x64)
    out = run(lambda xs, st: ops.mlstm(*xs, st, backend=backend, chunk_size=16, cu_seqlens=cu), x)
    return ref, out


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("backend", [Backend.NATIVE, Backend.REFERENCE])
def test_varlen_cpu_backends(backend, with_state):
    ref, out = run_case(backend, torch.float64, with_state)
    assert_close("h", ref[0], out[0], torch.float64)
    for name, a, b in zip("cnm", ref[1], out[1]):
        assert_close(f"state.{name}", a, b, torch.float64)
    for name, a, b in zip(["q", "k", "v", "i", "f", "c0", "n0", "m0"], ref[2], out[2]):
        assert_close(f"grad {name}", a, b, torch.float64)


@pytest.mark.parametrize("with_state", [False, True])
def test_varlen_triton(with_state):
    pytest.importorskip("triton")
    ref, out = run_case(Backend.TRITON, torch.float32, with_state, device="cuda" if torch.cuda.is_available() else "cpu")
    fwd, bwd = torch.float32, "float32_den"      # fp32 inputs: exact fp32 dots on the GPU too
    assert_close("h", ref[0], out[0], bwd)  # h goes through the denominator too
    for name, a, b in zip("cnm", ref[1], out[1]):
        assert_close(f"state.{name}", a, b, fwd)
    for name, a, b in zip(["q", "k", "v", "i", "f", "c0", "n0", "m0"], ref[2], out[2]):
        assert_close(f"grad {name}", a, b, bwd)


def test_varlen_matches_dense_batch_for_equal_lengths():
    (q, k, v, i, f), _ = make_mlstm_inputs(3, 20, 2, 4, 4)
    h, s = ops.mlstm(q, k, v, i, f, backend=Backend.NATIVE, chunk_size=8)
    packed = [t.reshape(1, 60, *t.shape[2:]) for t in (q, k, v, i, f)]
    hp, sp = ops.mlstm(*packed, backend=Backend.NATIVE, chunk_size=8, cu_seqlens=torch.tensor([0, 20, 40, 60]))
    assert_close("h", h.reshape(1, 60, 2, 4), hp, torch.float64)
    for a, b in zip(s, sp):
        assert_close("state", a, b, torch.float64)


def test_bad_cu_seqlens_raise():
    (q, k, v, i, f), _ = make_mlstm_inputs(1, 10, 2, 4, 4)
    for bad in ([0, 4], [1, 10], [0, 6, 4, 10]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            ops.mlstm(q, k, v, i, f, cu_seqlens=torch.tensor(bad))
    (q2, k2, v2, i2, f2), _ = make_mlstm_inputs(2, 10, 2, 4, 4)
    with pytest.raises(ValueError, match="B=1"):
        ops.mlstm(q2, k2, v2, i2, f2, cu_seqlens=torch.tensor([0, 10]))
    state = MLSTMState.zeros(1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch 2"):
        ops.mlstm(q, k, v, i, f, state, cu_seqlens=torch.tensor([0, 4, 10]))
