"""The decode kernels (fastxlstm/ops/decode/triton: the step kernel, skinny_linear) against plain
float64 math on the same inputs.

Without CUDA they run under TRITON_INTERPRET=1 at tiny shapes (set here, before the kernels are
decorated). The interpreter's tl.dot is wrong for bfloat16 operands, so there skinny_linear runs in
float32 and float16 only. The GPU tests run the 7B shapes in bfloat16 at batch 1 and 16.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fastxlstm.layers.common import head_layer_norm  # noqa: E402
from fastxlstm.ops import MLSTMState  # noqa: E402
from fastxlstm.ops import decode  # noqa: E402
from fastxlstm.ops.mlstm import reference  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rnd(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(device=DEVICE, dtype=dtype)


def lock_for(*sizes):
    return torch.zeros(max(sizes + (1,)), device=DEVICE, dtype=torch.int32)


def step_inputs(B, H, K, V, dtype):
    q, k, o = rnd(B, H * K, dtype=dtype), rnd(B, H * K, dtype=dtype), rnd(B, H * V, dtype=dtype)
    v = rnd(B, H * V, dtype=dtype)
    i, f = rnd(B, H, dtype=dtype, scale=3.0), rnd(B, H, dtype=dtype, scale=3.0, shift=2.0)
    state = MLSTMState(rnd(B, H, K, V, dtype=torch.float32), rnd(B, H, K, dtype=torch.float32),
                       rnd(B, H, dtype=torch.float32, scale=2.0))
    return torch.cat([q, k, v, o, i, f], dim=1), (H * K, H * K, H * V, H * V, H, H), state


def step_reference(y, sizes, state, H, head_w, head_b):
    q, k, v, o, i, f = y.double().split(sizes, dim=-1)
    B = y.shape[0]
    h, s = reference.mlstm_step(q.view(B, H, -1), k.view(B, H, -1), v.view(B, H, -1), i, f,
                                MLSTMState(*(t.double() for t in state)))
    hb = None if head_b is None else head_b.double()
    return torch.sigmoid(o) * head_layer_norm(h, head_w.double(), hb, 1e-6, True), s


@pytest.mark.parametrize("early,inplace", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,K,V,BK", [(1, 2, 8, 16, 16), (3, 2, 16, 24, 4), (2, 3, 12, 16, 8)])
def test_mlstm_head_step(dtype, B, H, K, V, BK, early, inplace, poison, monkeypatch):
    """One program per head (BK >= Dqk), or Dqk split over programs with the last one reducing;
    Dv not a power of two; Dqk not a multiple of the tile; the state read before or after the
    wait on the previous launch (early: with PDL, on a GPU); C and n written over the input state."""
    monkeypatch.setitem(decode.CONFIG, "step", dict(decode.CONFIG["step"], BK=BK))
    y, sizes, state = step_inputs(B, H, K, V, dtype)
    head_w, head_b = rnd(H * V, dtype=dtype, scale=0.3, shift=1.0), rnd(H * V, dtype=dtype, scale=0.1)
    lock = lock_for(B * H)
    given = MLSTMState(*(t.clone() for t in state))
    out, s = decode.mlstm_head_step(y, sizes, given, head_w, head_b, num_heads=H, eps=1e-6, norm_eps=1e-6,
                                    lock=lock, early_state=early, inplace=inplace)
    ref, s_ref = step_reference(y, sizes, state, H, head_w, head_b)
    assert out.dtype == dtype and s.c.dtype == torch.float32
    assert (s.c is given.c and s.n is given.n) == inplace
    assert torch.equal(given.m, state.m) and s.m is not given.m        # m is read by every program: never in place
    if not inplace:
        assert all(torch.equal(a, b) for a, b in zip(given, state))
    assert_close("sigmoid(o) * head_norm(h)", ref, out, dtype)
    for name in "cnm":
        assert_close(f"state.{name}", getattr(s_ref, name), getattr(s, name), torch.float32)
    assert not lock.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mlstm_head_step_caps_the_gates_itself(dtype, poison):
    # gate_cap: i and f capped in the kernel (the hybrid decode path's cuBLAS GEMM does not), as
    # soft_cap in the model dtype would (its tanh is not torch's: equal to the dtype's rounding)
    from fastxlstm.layers.common import soft_cap

    B, H, K, V = 2, 2, 16, 24
    y, sizes, state = step_inputs(B, H, K, V, dtype)
    y[:, -2 * H:] *= 8                                    # gate pre-activations well past the cap
    capped = torch.cat([y[:, :-2 * H], soft_cap(y[:, -2 * H:], 15.0)], dim=1)
    head_w = rnd(H * V, dtype=dtype, scale=0.3, shift=1.0)
    out, s = decode.mlstm_head_step(y, sizes, state, head_w, num_heads=H, eps=1e-6, norm_eps=1e-6, gate_cap=15.0,
                                    lock=lock_for(B * H))
    ref, s_ref = step_reference(capped, sizes, state, H, head_w, None)
    assert_close("sigmoid(o) * head_norm(h)", ref, out, dtype)
    for name in "cnm":
        assert_close(f"state.{name}", getattr(s_ref, name), getattr(s, name), dtype)
    _, s_uncapped = step_reference(y, sizes, state, H, head_w, None)
    assert not torch.allclose(s_uncapped.m.float(), s.m, rtol=0.01, atol=0.01)   # the caps mattered


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("N,K,splits", [(40, 96, None), (130, 200, 3), (64, 72, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear(dtype, M, N, K, splits, bias, monkeypatch):
    """One program per tile or K split over programs (the last one adds the partials in order);
    N not a multiple of the tile, K not a multiple of the loop step; the counters left at zero."""
    monkeypatch.setitem(decode.triton.skinny.CONFIG, "shapes", {f"{N}x{K}": dict(BK=32, splits=splits)})
    x, w = rnd(M, K, dtype=dtype), rnd(N, K, dtype=dtype, scale=K ** -0.5)
    b = rnd(N, dtype=dtype) if bias else None
    lock = lock_for(decode.skinny_lock_size(N, K, DEVICE))
    y = decode.skinny_linear(x, w, b, lock=lock)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close("x w^T + b", ref, y, dtype)
    assert not lock.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("F_,K,splits", [(20, 96, None), (70, 200, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_silu_gate_times_up(dtype, M, F_, K, splits, bias, monkeypatch):
    """glu: the gate|up GEMM with silu(gate) * up in its epilogue (a program takes matching gate and
    up rows); one program per tile or K split (the partials of both halves added in order)."""
    import torch.nn.functional as F

    monkeypatch.setitem(decode.triton.skinny.CONFIG, "shapes", {f"{2 * F_}x{K}": dict(BK=32, splits=splits)})
    x, w = rnd(M, K, dtype=dtype), rnd(2 * F_, K, dtype=dtype, scale=K ** -0.5)
    b = rnd(2 * F_, dtype=dtype) if bias else None
    lock = lock_for(decode.skinny_lock_size(2 * F_, K, DEVICE))
    y = decode.skinny_linear(x, w, b, glu=True, lock=lock)
    gu = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (M, F_)
    assert_close("silu(gate) * up", F.silu(gu[:, :F_]) * gu[:, F_:], y, dtype)
    assert not lock.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bn", [64, 32])
def test_skinny_linear_carries_a_residual_add_and_rms_norm_to_the_next_gemm(dtype, M, splits, glu, bn, monkeypatch):
    """h = r + x w1^T + b1 in the first GEMM's epilogue, with h * g and each tile's sums of h^2;
    the next GEMM scales its rows by rsqrt(mean(h^2) + eps): together rms_norm(h) w2^T + b2 (with
    or without the glu), no launch between. E = 150: three tiles of 64 (or five of 32, as the 7B's
    out_proj and proj_down make them for 64-row consumers), the last one short."""
    import torch.nn.functional as F

    E, K, N2, eps = 150, 96, 40, 1e-5
    monkeypatch.setitem(decode.triton.skinny.CONFIG, "shapes", {f"{E}x{K}": dict(BN=bn, BK=32, splits=splits),
                                                               f"{N2}x{E}": dict(BK=32, splits=splits)})
    x, r = rnd(M, K, dtype=dtype), rnd(M, E, dtype=dtype)
    w1, b1 = rnd(E, K, dtype=dtype, scale=K ** -0.5), rnd(E, dtype=dtype)
    g = rnd(E, dtype=dtype, scale=0.2, shift=1.0)
    w2, b2 = rnd(N2, E, dtype=dtype, scale=E ** -0.5), rnd(N2, dtype=dtype)
    lock = lock_for(decode.skinny_lock_size(E, K, DEVICE), decode.skinny_lock_size(N2, E, DEVICE))
    sums = torch.full((128,), float("nan"), device=DEVICE)
    h, hg, sq = decode.skinny_linear(x, w1, b1, lock=lock, residual=r, norm_weight=g, sumsq=sums)
    y = decode.skinny_linear(hg, w2, b2, glu=glu, lock=lock, rms=sq, eps=eps)
    h_ref = r.double() + x.double() @ w1.double().T + b1.double()
    assert h.dtype == dtype and sq.shape == (-(-E // bn), 16)
    assert_close("r + x w1^T + b1", h_ref, h, dtype)
    assert_close("h * g", h_ref * g.double(), hg, dtype)
    assert_close("sums of h^2", h_ref.pow(2).sum(-1), sq[:, :M].sum(0), dtype)
    xn = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + eps) * g.double()
    y_ref = xn @ w2.double().T + b2.double()
    if glu:
        y_ref = F.silu(y_ref[:, :N2 // 2]) * y_ref[:, N2 // 2:]
    assert_close("rms_norm(h) w2^T + b2", y_ref, y, dtype)
    assert not lock.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("cap", [30.0, 3.0, None])
def test_skinny_linear_ends_the_lm_head_as_the_model(dtype, cap):
    """logits: float32, the GEMM rounded to the weights' dtype then soft-capped in float32."""
    from fastxlstm.layers.common import soft_cap

    x, w = rnd(3, 72, dtype=dtype, scale=3.0), rnd(90, 72, dtype=dtype, scale=72 ** -0.5)
    y = decode.skinny_linear(x, w, logits=True, logit_cap=cap)
    assert y.dtype == torch.float32 and y.shape == (3, 90)
    ref = soft_cap((x.double() @ w.double().T).to(dtype).double(), cap)
    assert_close("soft_cap(x w^T)", ref, y, dtype)
    if cap:
        assert y.abs().max() <= cap


@pytest.mark.parametrize("N,splits,M", [(1000, None, 3), (1000, 3, 16), (70, None, 1)])
def test_skinny_linear_writes_the_greedy_argmax(N, splits, M, monkeypatch):
    """argmax_out: each row's first maximum over all tiles (the last tile to finish reduces the
    tiles' picks), written into a strided column; ties across tiles go to the lowest index, NaN is
    the largest (as torch.argmax); the counters are left at zero."""
    monkeypatch.setitem(decode.triton.skinny.CONFIG, "shapes", {f"{N}x96": dict(BK=32, splits=splits)})
    x, w = rnd(M, 96, dtype=torch.float32, scale=3.0), rnd(N, 96, dtype=torch.float32, scale=0.1)
    tie = x[0] / x[0].norm() * 4                                        # row 0's maximum, three times
    w[N // 3] = w[N // 2] = w[N - 1] = tie
    if M > 1:
        w[N // 4, 0] = float("nan")                                     # a NaN logit in every row
    lock = lock_for(decode.skinny_lock_size(N, 96, DEVICE, argmax=True))
    out = torch.full((M, 4), -1, dtype=torch.int64, device=DEVICE)
    y = decode.skinny_linear(x, w, logits=True, logit_cap=30.0, lock=lock, argmax_out=out[:, 2])
    assert torch.equal(out[:, 2], y.argmax(-1))
    assert out[0, 2] == (N // 4 if M > 1 else N // 3)
    assert (out[:, [0, 1, 3]] == -1).all() and not lock.any()


def test_skinny_linear_refuses_bad_input():
    x, w = torch.zeros(17, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        decode.skinny_linear(x, w)
    with pytest.raises(ValueError, match="agree in K"):
        decode.skinny_linear(x[:2], w[:, :6])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        decode.skinny_linear(x[:2].double(), w.double())
    with pytest.raises(ValueError, match="int32 zeros"):
        decode.skinny_linear(x[:2], w, lock=torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="even number of weight rows"):
        decode.skinny_linear(x[:2], w[:3], glu=True)
    with pytest.raises(ValueError, match="residual must be"):
        decode.skinny_linear(x[:2], w, residual=x[:2])
    with pytest.raises(ValueError, match="go together"):
        decode.skinny_linear(x[:2], w, norm_weight=w[0, :4])
    with pytest.raises(ValueError, match="sumsq must be float32"):
        decode.skinny_linear(x[:2], w, norm_weight=w[0, :4], sumsq=torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="logits takes no glu"):
        decode.skinny_linear(x[:2], w, residual=torch.zeros(2, 4, device=DEVICE), logits=True)
    with pytest.raises(ValueError, match="argmax_out must be"):
        decode.skinny_linear(x[:2], w, argmax_out=torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="needs a lock of at least"):
        decode.skinny_linear(x[:2], w, logits=True, argmax_out=torch.zeros(2, dtype=torch.int64, device=DEVICE),
                             lock=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="rms must be"):
        decode.skinny_linear(x[:2], w, rms=torch.zeros(1, 8, device=DEVICE))


def test_shapes_are_checked():
    y, sizes, state = step_inputs(1, 2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="sizes must be"):
        decode.mlstm_head_step(y, sizes[:5], state, y[0, :32], num_heads=2, eps=1e-6, norm_eps=1e-6)


# --- GPU: the 7B shapes (E 4096, 8 heads, Dqk 256, Dv 512, FFN 10944, vocab 50304) ----------------

@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_gpu_skinny_linear_at_the_7b_shapes(M):
    lock = lock_for(50304)
    for N, K in [(4096, 4096), (12304, 4096), (21888, 4096), (4096, 10944), (50304, 4096)]:
        x, w, b = rnd(M, K, dtype=torch.bfloat16), rnd(N, K, dtype=torch.bfloat16, scale=K ** -0.5), rnd(N, dtype=torch.bfloat16)
        assert_close(f"{N}x{K}", x.double() @ w.double().T + b.double(), decode.skinny_linear(x, w, b, lock=lock),
                     torch.bfloat16)
    torch.cuda.synchronize()
    assert not lock.any()


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16])
def test_gpu_mlstm_head_step_at_the_7b_shape(B):
    H, K, V = 8, 256, 512
    y, sizes, state = step_inputs(B, H, K, V, torch.bfloat16)
    head_w = rnd(H * V, dtype=torch.bfloat16, scale=0.3, shift=1.0)
    lock = lock_for(B * H)
    out, s = decode.mlstm_head_step(y, sizes, state, head_w, num_heads=H, eps=1e-6, norm_eps=1e-6, lock=lock)
    ref, s_ref = step_reference(y, sizes, state, H, head_w, None)
    assert_close("sigmoid(o) * head_norm(h)", ref, out, torch.bfloat16)
    for name in "cnm":
        assert_close(f"state.{name}", getattr(s_ref, name), getattr(s, name), torch.float32)
    assert not lock.any()
