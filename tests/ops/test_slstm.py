"""sLSTM ops: native and Triton (interpreter on CPU) against the reference loop, forward, final
state and every gradient, with and without an initial state; state passing across a split."""

import os

import torch

if not torch.cuda.is_available():
    # must precede the first import of the Triton kernels (they are decorated at import time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastxlstm import ops  # noqa: E402
from fastxlstm.ops import Backend, SLSTMState  # noqa: E402
from fastxlstm.ops import triton_available  # noqa: E402
from fastxlstm.ops.slstm import available, reference  # noqa: E402
from tests.helpers import assert_close, poison_allocations  # noqa: E402

LENGTHS = [1, 2, 17, 64]
FAST = [b for b in available() if b is not Backend.REFERENCE and (b is not Backend.TRITON or triton_available())]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, T, H, D, *, dtype, with_state, zero_n=False, seed=0, device="cpu"):
    """x, r and an optional initial state (float64 masters, cast to dtype; grads on the casts)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, 4, D, generator=g, dtype=torch.float64) * 2.0
    x[:, :, :, 1] += 1.0                                   # forget gates mostly open, as trained models
    r = torch.randn(H, D, 4, D, generator=g, dtype=torch.float64) * (0.8 / D ** 0.5)
    tensors = [x, r]
    if with_state:
        n = torch.rand(B, H, D, generator=g, dtype=torch.float64) + 0.2
        c = torch.randn(B, H, D, generator=g, dtype=torch.float64) * n
        if zero_n:                                         # some elements have stored nothing yet
            keep = torch.rand(B, H, D, generator=g) > 0.5
            n, c = n * keep, c * keep
        m = torch.randn(B, H, D, generator=g, dtype=torch.float64)
        h = torch.tanh(torch.randn(B, H, D, generator=g, dtype=torch.float64))
        tensors += [c, n, m, h]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    out = [t.to(device=device, dtype=dtype if k < 2 else sdt).requires_grad_() for k, t in enumerate(tensors)]
    return out[0], out[1], (SLSTMState(*out[2:]) if with_state else None)


def run(backend, x, r, state, forget_gate="sigmoid", seed=1):
    """Outputs and the gradients of (h . dh) + sum(state . dstate) w.r.t. x, r and the initial state."""
    h, s = ops.slstm(x, r, state, backend=backend, forget_gate=forget_gate)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in (h, *s)]
    loss = sum((t * w).sum() for t, w in zip((h, *s), weights))
    inputs = [x, r] + (list(state) if state is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return h, s, grads


def compare(name, ref, out, dtype, grad_dtype=None):
    (h0, s0, g0), (h1, s1, g1) = ((h.cpu(), [t.cpu() for t in s], [t.cpu() for t in g]) for h, s, g in (ref, out))
    assert_close(f"{name} h", h0, h1, dtype)
    for field, a, b in zip(SLSTMState._fields, s0, s1):
        assert_close(f"{name} state.{field}", a, b, dtype)
    names = ["dx", "dr"] + [f"d{f}0" for f in SLSTMState._fields]
    for gname, a, b in zip(names, g0, g1):
        if a.abs().max() == 0:                             # e.g. dr at T=1 from a zero h0
            assert b.abs().max() == 0, f"{name} {gname}: expected zero"
        else:
            assert_close(f"{name} {gname}", a, b, grad_dtype or dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_backend_matches_reference(backend, T, with_state):
    # float64 for native (exact math); Triton computes in float32 against a float64 oracle
    dtype = torch.float64 if backend is Backend.NATIVE else torch.float32
    B, H, D = 3, 2, 5
    ref = run(Backend.REFERENCE, *make_inputs(B, T, H, D, dtype=torch.float64, with_state=with_state))
    out = run(backend, *make_inputs(B, T, H, D, dtype=dtype, with_state=with_state, device=DEVICE))
    compare(f"{backend} T={T}", ref, out, dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_forget_gates_and_partly_empty_state(backend, forget_gate):
    """Elements whose n is exactly 0 take m = i (per element), the rest the max."""
    dtype = torch.float64 if backend is Backend.NATIVE else torch.float32
    args = dict(with_state=True, zero_n=True)
    ref = run(Backend.REFERENCE, *make_inputs(2, 9, 2, 6, dtype=torch.float64, **args), forget_gate=forget_gate)
    out = run(backend, *make_inputs(2, 9, 2, 6, dtype=dtype, device=DEVICE, **args), forget_gate=forget_gate)
    compare(f"{backend} {forget_gate}", ref, out, dtype)


def triton_grads(x, r, state, **launch):
    from fastxlstm.ops.slstm import triton as slstm_triton

    h, s = slstm_triton.slstm(x, r, state, **launch)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in (h, *s)]
    loss = sum((t * w).sum() for t, w in zip((h, *s), weights))
    return h, s, torch.autograd.grad(loss, [x, r, *state])


@pytest.mark.skipif(Backend.TRITON not in FAST, reason="Triton not installed")
@pytest.mark.parametrize("T, launch", [(1, dict()), (5, dict()), (5, dict(block_b=32, bwd_block_b=32))])
def test_triton_batch_tiles(T, launch):
    """D = 40 (padded to 64 in the kernels); batch 19 spans two tiles of 16 (one of 32)."""
    ref = run(Backend.REFERENCE, *make_inputs(19, T, 2, 40, dtype=torch.float64, with_state=True))
    x, r, state = make_inputs(19, T, 2, 40, dtype=torch.float32, with_state=True, device=DEVICE)
    compare("triton tiles", ref, triton_grads(x, r, state, **launch), torch.float32)


@pytest.mark.skipif(Backend.TRITON not in FAST or DEVICE == "cuda", reason="interpreter only")
def test_triton_split_indexing_in_interpreter(monkeypatch):
    """The split path's slicing of R and its h / dpre exchange, without the barrier the
    interpreter cannot run: 3 programs of 16 units per head (D 40, the last partial), 2 batch
    tiles, T 1, every launch run twice, so the second run reads what all programs wrote in the
    first (at T 1 each program's writes before the exchange do not depend on the others)."""
    from fastxlstm.ops.slstm import triton as slstm_triton

    plan, launch = slstm_triton.plan, slstm_triton.launch

    def split_plan(B, H, D, device, block_b, block_n, num_warps):
        meta = plan(B, H, D, device, block_b, None, num_warps)
        return {**meta, "BLOCK_N": 16, "programs": -(-D // 16), "SPLIT": 1}   # split grid, no barrier

    def launch_twice(*args, **kw):
        launch(*args, **kw)
        launch(*args, **kw)

    monkeypatch.setattr(slstm_triton, "plan", split_plan)
    monkeypatch.setattr(slstm_triton, "launch", launch_twice)
    ref = run(Backend.REFERENCE, *make_inputs(19, 1, 2, 40, dtype=torch.float64, with_state=True))
    x, r, state = make_inputs(19, 1, 2, 40, dtype=torch.float32, with_state=True)
    compare("triton split", ref, triton_grads(x, r, state), torch.float32)

    monkeypatch.setattr(slstm_triton, "launch", launch)    # one run, fresh buffers NaN: dh0 must miss dpre
    poison_allocations(monkeypatch)
    x, r, state = make_inputs(19, 1, 2, 40, dtype=torch.float32, with_state=True)
    dh0 = triton_grads(x, r, state)[2][-1]
    assert not torch.isfinite(dh0).all(), "one run saw every program's dpre: the test would not see the exchange"


def test_reference_matches_formula_by_hand():
    """The first step from zeros: m = i, so i' = 1, c = tanh(z), n = 1, h = sigmoid(o) tanh(z)."""
    x, r, _ = make_inputs(2, 1, 2, 3, dtype=torch.float64, with_state=False)
    h, s = reference.slstm(x, r)
    i, f, z, o = x[:, 0].unbind(2)
    torch.testing.assert_close(s.m, i)
    torch.testing.assert_close(s.n, torch.ones_like(i))
    torch.testing.assert_close(h[:, 0], torch.sigmoid(o) * torch.tanh(z))


@pytest.mark.parametrize("backend", [Backend.REFERENCE] + FAST)
def test_state_passing_across_split(backend):
    dtype = torch.float32 if backend is Backend.TRITON else torch.float64
    x, r, state = make_inputs(2, 23, 2, 4, dtype=dtype, with_state=True, device=DEVICE)
    h, s = ops.slstm(x, r, state, backend=backend)
    h1, s1 = ops.slstm(x[:, :10], r, state, backend=backend)
    h2, s2 = ops.slstm(x[:, 10:], r, s1, backend=backend)
    assert_close("split h", h, torch.cat([h1, h2], 1), dtype)
    for field, a, b in zip(SLSTMState._fields, s, s2):
        assert_close(f"split {field}", a, b, dtype)
    hs, ss = [], state
    for t in range(5):
        ht, ss = ops.slstm_step(x[:, t], r, ss, backend=backend)
        hs.append(ht)
    assert_close("steps h", h[:, :5], torch.stack(hs, 1), dtype)


def test_reference_gradcheck():
    x, r, state = make_inputs(1, 3, 1, 2, dtype=torch.float64, with_state=True)
    torch.autograd.gradcheck(lambda *a: reference.slstm(a[0], a[1], SLSTMState(*a[2:]))[0], (x, r, *state))


@pytest.mark.parametrize("bad, match", [
    (dict(x=(2, 3, 2, 3, 4)), "x must be"),
    (dict(r=(2, 4, 4, 5)), "r must be"),
    (dict(state_c=(2, 2, 5)), "state.c must"),
    (dict(forget_gate="tanh"), "forget_gate"),
])
def test_bad_inputs_raise(bad, match):
    x = torch.randn(*bad.get("x", (2, 3, 2, 4, 4)))
    r = torch.randn(*bad.get("r", (2, 4, 4, 4)))
    z = torch.zeros(2, 2, 4)
    state = SLSTMState(torch.zeros(*bad["state_c"]), z, z, z) if "state_c" in bad else None
    with pytest.raises(ValueError, match=match):
        ops.slstm(x, r, state, forget_gate=bad.get("forget_gate", "sigmoid"))


# GPU: the split kernels (programs of one head meeting at a global-memory barrier every step) at
# the benchmark's head shape, against the float64 reference on the same rounded inputs.
GRAD_TOL = {torch.float32: "float32_den", torch.bfloat16: torch.bfloat16}


def gpu_check(monkeypatch, B, T, dtype, *, with_state=True, forget_gate="sigmoid", **launch):
    x, r, state = make_inputs(B, T, 4, 256, dtype=dtype, with_state=with_state, device="cuda")
    ref_in = [t.detach().double().requires_grad_() for t in (x, r)]
    ref_state = SLSTMState(*(t.detach().double().requires_grad_() for t in state)) if with_state else None
    ref = run(Backend.REFERENCE, *ref_in, ref_state, forget_gate=forget_gate)
    poison_allocations(monkeypatch)
    from fastxlstm.ops.slstm import triton as slstm_triton

    h, s = slstm_triton.slstm(x, r, state, forget_gate=forget_gate, **launch)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in (h, *s)]
    loss = sum((t * w).sum() for t, w in zip((h, *s), weights))
    grads = torch.autograd.grad(loss, [x, r, *(state or ())])
    compare(f"triton {dtype} B{B} T{T}", ref, (h, s, grads), dtype, GRAD_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_real_shape(monkeypatch, dtype):
    """B 16, T 512, E 1024 in 4 heads of 256: 16 programs per head, one launch each way."""
    gpu_check(monkeypatch, 16, 512, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_several_launches(monkeypatch, dtype):
    """B 48 in tiles of 16 x 16 programs per head: more programs than SMs (132 on an H200), so the
    tiles run in launches one after another; exp forget gate, zero initial state."""
    gpu_check(monkeypatch, 48, 64, dtype, with_state=False, forget_gate="exp", block_b=16, block_n=16,
              bwd_block_n=16)


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [dict(block_n=32, bwd_block_n=32), dict(block_b=32, num_warps=4),
                                    dict(block_n=64, bwd_block_n=64)])
def test_triton_gpu_launch_variants(monkeypatch, launch):
    """Other slices (8 or 4 programs per head), a 32-row tile and 4 warps: the same function."""
    gpu_check(monkeypatch, 20, 128, torch.bfloat16, **launch)


@pytest.mark.skipif(Backend.TRITON not in FAST or DEVICE == "cuda", reason="interpreter only")
def test_triton_fp16_stabiliser_near_ties():
    """fp16 in the interpreter, each m0 set so that i and m0 + log f (the two arms of the
    stabiliser's max) differ by +-2e-5 in exact arithmetic. The gradient of a loss on the final
    c, n, m goes through m to i or to f depending on which arm wins; the pre-activations must be
    accurate well below that gap or the kernel takes the other arm and dx, dR are off by O(dm).
    A kernel that rounds h_0 to fp16 before the recurrent dot moves them by ~1e-4 (rel max-abs
    error ~0.3 in dx); with h as hi + lo they match the reference to float32 rounding."""
    B, H, D = 8, 2, 32
    x, r, state = make_inputs(B, 1, H, D, dtype=torch.float16, with_state=True)
    with torch.no_grad():
        pre = x.double()[:, 0] + torch.einsum("bhd,hdge->bhge", state.h.double(), r.double())
        logf = torch.nn.functional.logsigmoid(pre[:, :, 1])
        gap = 2e-5 * (torch.randint(0, 2, (B, H, D), generator=torch.Generator().manual_seed(2)) * 2 - 1)
        state.m.copy_(pre[:, :, 0] - logf - gap)           # i - (m0 + log f) = gap
    ref_in = [t.detach().double().requires_grad_() for t in (x, r)]
    ref_state = SLSTMState(*(t.detach().double().requires_grad_() for t in state))
    ref = run(Backend.REFERENCE, *ref_in, ref_state)
    compare("triton fp16 near ties", ref, triton_grads(x, r, state), torch.float16)
