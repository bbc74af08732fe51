"""mLSTM ops: every CPU backend and form against the recurrent reference, forward, state and gradients."""

import pytest
import torch

from fastxlstm import ops
from fastxlstm.ops import Backend, MLSTMState
from fastxlstm.ops.mlstm import native, reference
from tests.helpers import assert_close, make_mlstm_inputs

# Triton runs under the interpreter at tiny shapes in its own test module.
CPU_BACKENDS = [Backend.REFERENCE, Backend.NATIVE]
FORMS = {
    "parallel": lambda *a, chunk_size, **kw: reference.mlstm_parallel(*a, **kw),
    "native": native.mlstm,
}


def lengths(L):
    return [1, L - 1, L, L + 1, 3 * L + 7]


def step_loop(q, k, v, i, f, state):
    hs = []
    for t in range(q.shape[1]):
        h, state = ops.mlstm_step(q[:, t], k[:, t], v[:, t], i[:, t], f[:, t], state, backend=Backend.NATIVE)
        hs.append(h)
    return torch.stack(hs, 1), state


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_forms_agree_float64(chunk_size, with_state):
    for T in lengths(chunk_size):
        (q, k, v, i, f), state = make_mlstm_inputs(2, T, 3, 5, 7, with_state=with_state)
        h_ref, s_ref = reference.mlstm(q, k, v, i, f, state)
        outs = {name: form(q, k, v, i, f, state, chunk_size=chunk_size) for name, form in FORMS.items()}
        outs["step loop"] = step_loop(q, k, v, i, f, state)
        for name, (h, s) in outs.items():
            assert_close(f"{name} h T={T}", h_ref, h, torch.float64)
            for field, a, b in zip(MLSTMState._fields, s_ref, s):
                assert_close(f"{name} state.{field} T={T}", a, b, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_split_sequence_state_passing(backend):
    (q, k, v, i, f), state = make_mlstm_inputs(2, 50, 2, 8, 6, with_state=True)
    h, s = ops.mlstm(q, k, v, i, f, state, backend=backend, chunk_size=16)
    for t in (1, 16, 23):
        h1, s1 = ops.mlstm(*(x[:, :t] for x in (q, k, v, i, f)), state, backend=backend, chunk_size=16)
        h2, s2 = ops.mlstm(*(x[:, t:] for x in (q, k, v, i, f)), s1, backend=backend, chunk_size=16)
        assert_close(f"split at {t}", h, torch.cat([h1, h2], 1), torch.float64)
        for a, b in zip(s, s2):
            assert_close(f"final state, split at {t}", a, b, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_state", [False, True])
def test_gradients_match_reference_autograd(backend, with_state):
    (q, k, v, i, f), state = make_mlstm_inputs(2, 37, 2, 6, 5, with_state=with_state, requires_grad=True)
    inputs = [q, k, v, i, f] + (list(state) if with_state else [])
    do = torch.randn(2, 37, 2, 5, dtype=torch.float64)
    ds = [torch.randn_like(t) for t in (state or MLSTMState.zeros(2, 2, 6, 5, dtype=torch.float64))]

    def loss(fn):
        h, s = fn(q, k, v, i, f, state)
        return (h * do).sum() + sum((a * b).sum() for a, b in zip(s, ds))

    ref = torch.autograd.grad(loss(reference.mlstm), inputs)
    out = torch.autograd.grad(loss(lambda *a: ops.mlstm(*a, backend=backend, chunk_size=16)), inputs)
    names = ["q", "k", "v", "i", "f", "c0", "n0", "m0"]
    for name, a, b in zip(names, ref, out):
        assert_close(f"grad {name}", a, b, torch.float64)


@pytest.mark.parametrize("fn", [reference.mlstm, reference.mlstm_parallel,
                                lambda *a: native.mlstm(*a, chunk_size=4)], ids=["recurrent", "parallel", "native"])
def test_gradcheck(fn):
    (q, k, v, i, f), state = make_mlstm_inputs(1, 9, 2, 3, 2, with_state=True, requires_grad=True)

    def flat(q, k, v, i, f, c, n, m):
        h, s = fn(q, k, v, i, f, MLSTMState(c, n, m))
        return h, *s

    assert torch.autograd.gradcheck(flat, (q, k, v, i, f, *state))


def test_state_is_never_modified_in_place():
    (q, k, v, i, f), state = make_mlstm_inputs(1, 20, 2, 4, 4, with_state=True)
    before = [t.clone() for t in state]
    ops.mlstm(q, k, v, i, f, state, backend=Backend.NATIVE, chunk_size=8)
    ops.mlstm_step(q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], state, backend=Backend.NATIVE)
    for a, b in zip(before, state):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_without_autocast(dtype):
    (q, k, v, i, f), _ = make_mlstm_inputs(2, 70, 2, 16, 16, dtype=dtype)
    h, s = ops.mlstm(q, k, v, i, f, backend=Backend.NATIVE, chunk_size=32)
    assert h.dtype == dtype and all(t.dtype == torch.float32 for t in s)
    h_ref, s_ref = reference.mlstm(*(x.double() for x in (q, k, v, i, f)))
    assert_close("h", h_ref, h, dtype)
    assert_close("c", s_ref.c, s.c, torch.float32)


def test_extreme_gates_stay_finite():
    for gate in (50.0, -50.0):
        (q, k, v, i, f), _ = make_mlstm_inputs(1, 40, 2, 4, 4, dtype=torch.float32)
        ones = torch.ones_like(i)
        for ig, fg in ((gate * ones, gate * ones), (gate * ones, -gate * ones), (-gate * ones, gate * ones)):
            h, s = ops.mlstm(q, k, v, ig, fg, backend=Backend.NATIVE, chunk_size=16)
            assert torch.isfinite(h).all() and all(torch.isfinite(t).all() for t in s)


def test_long_stream_in_pieces_stays_finite():
    # 100,000 tokens carried through the state piece by piece, gates at the model's soft-cap range
    state = None
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        (q, k, v, i, f), _ = make_mlstm_inputs(1, 4000, 2, 8, 8, dtype=torch.float32, gate_scale=15.0, generator=g)
        h, state = ops.mlstm(q, k, v, i.clamp(-15, 15), f.clamp(-15, 15), state, backend=Backend.NATIVE,
                             chunk_size=64)
        assert torch.isfinite(h).all()
    assert all(torch.isfinite(t).all() for t in state)


def test_bad_inputs_raise_naming_the_argument():
    (q, k, v, i, f), _ = make_mlstm_inputs(2, 8, 2, 4, 4)
    with pytest.raises(ValueError, match="k must"):
        ops.mlstm(q, k[:, :, :1], v, i, f)
    with pytest.raises(ValueError, match="i must"):
        ops.mlstm(q, k, v, i[:, :4], f)
    with pytest.raises(ValueError, match="q must be floating"):
        ops.mlstm(q.long(), k, v, i, f)
    bad = MLSTMState(torch.zeros(2, 2, 4, 5), torch.zeros(2, 2, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="state.c"):
        ops.mlstm(q, k, v, i, f, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.mlstm(q, k, v, i, f, chunk_size=0)
    with pytest.raises(ValueError):
        ops.mlstm(q, k, v, i, f, backend="cuda-magic")
