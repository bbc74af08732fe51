"""The fused row kernels of inference forwards (fastxlstm/ops/rowwise) against the eager formulas
of layers/common.py on the same inputs, and the layers' choice between them.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set before they are decorated) at tiny
shapes; the layers never choose them for CPU tensors, so the model-level test forces the choice.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fastxlstm.config import PRESETS  # noqa: E402
from fastxlstm.layers.common import head_layer_norm, rms_norm  # noqa: E402
from fastxlstm.model import XLSTMLarge  # noqa: E402
from fastxlstm.ops import rowwise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16/fp16: the kernels and the eager formulas round at the same places and differ only in the
# float32 reductions' summation order (and exp's last bits), which can flip one rounding; the
# weight multiply (|w| up to ~1.6 here) and the next rounding carry it on: two steps of the output
# dtype (measured on the H200: 1.1 and 1.5 steps with a bias, run 18). The interpreter converts
# float32 to bfloat16 by truncation, not to nearest (checked against torch on 1000 values): the
# norms, with three or four roundings in a row, run bfloat16 on the GPU only.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}
NORM_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = ((out.double() - ref.double()).abs() / ref.double().abs().clamp_min(1.0)).max().item()
    assert err <= TOL[dtype], f"{dtype}: max relative error {err:.2e} > {TOL[dtype]:.1e}"


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_add_rms_norm(dtype, with_bias):
    x, y = (torch.randn(5, 3, 72, device=DEVICE).to(dtype) * 3 for _ in range(2))
    w = (1 + 0.2 * torch.randn(72, device=DEVICE)).to(dtype)
    b = (0.1 * torch.randn(72, device=DEVICE)).to(dtype) if with_bias else None
    s, out = rowwise.add_rms_norm(x, y, w, b, 1e-6)
    _close(s, x + y, dtype)
    _close(out, rms_norm(x + y, w, b, 1e-6, True), dtype)
    s, out = rowwise.add_rms_norm(x, None, w, b, 1e-6)
    assert torch.equal(s, x)
    _close(out, rms_norm(x, w, b, 1e-6, True), dtype)
    last = x[:, -1]                                   # rows 3 * 72 apart in memory
    _close(rowwise.add_rms_norm(last, None, w, b, 1e-6)[1], rms_norm(last, w, b, 1e-6, True), dtype)


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_head_norm(dtype, with_bias):
    B, T, H, D = 2, 7, 3, 40                      # D not a power of two: masked columns
    h = (torch.randn(B, T, H, D, device=DEVICE) * 2 + 0.5).to(dtype)
    o = (torch.randn(B, T, H * D, device=DEVICE) * 4).to(dtype)
    w = (1 + 0.2 * torch.randn(H * D, device=DEVICE)).to(dtype)
    b = (0.1 * torch.randn(H * D, device=DEVICE)).to(dtype) if with_bias else None
    ref = torch.sigmoid(o) * head_layer_norm(h, w, b, 1e-6, True)
    _close(rowwise.gated_head_norm(h, o, w, b, 1e-6), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_mul(dtype):
    g, u = (torch.randn(3, 5, 1001, device=DEVICE).to(dtype) * 6 for _ in range(2))   # a partial last block
    _close(rowwise.silu_mul(g, u), F.silu(g) * u, dtype)


def test_silu_mul_on_the_halves_of_one_projection():
    # gate | up as the two halves of one (B, T, 2F) tensor: rows 2F apart, read in place
    gu = torch.randn(3, 5, 2 * 1001, device=DEVICE) * 6
    gate, up = gu.split(1001, dim=-1)
    _close(rowwise.silu_mul(gate, up), F.silu(gate) * up, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_forward_and_backward_equal_eager_autograd(dtype):
    # y = [g | u]: silu(g) * u and the gradient of both halves in one tensor, rounded as autograd
    # of the eager formula in the same dtype rounds
    y = (torch.randn(3, 5, 2 * 1001, device=DEVICE) * 4).to(dtype).requires_grad_()
    out = rowwise.swiglu(y)
    da = torch.randn_like(out)
    (dy,) = torch.autograd.grad(out, y, da)
    g, u = y.chunk(2, dim=-1)
    ref = F.silu(g) * u
    (dy_ref,) = torch.autograd.grad(ref, y, da)
    _close(out, ref.detach(), dtype)
    _close(dy, dy_ref, dtype)


def test_swiglu_bad_input():
    with pytest.raises(ValueError, match="2F"):
        rowwise.swiglu(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="2F"):
        rowwise.swiglu(torch.zeros(2, 8, device=DEVICE, dtype=torch.float64))


def test_swiglu_layer_joint_gate_up_equals_two_projections(monkeypatch):
    # training's path (one GEMM over gate|up, rowwise.swiglu) against the two projections: output,
    # dL/dx and both weights' gradients
    from fastxlstm.layers import common

    torch.manual_seed(0)
    ffn = common.SwiGLU(24, 40).to(DEVICE)
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    runs = []
    for joint in (False, True):
        monkeypatch.setattr(common, "_joint_gate_up", lambda t, joint=joint: joint)
        out = ffn(x)
        grads = torch.autograd.grad(out.square().sum(), [x, ffn.proj_up_gate.weight, ffn.proj_up.weight,
                                                          ffn.proj_down.weight])
        runs.append((out, *grads))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_usable_only_for_gradient_free_cuda_calls():
    x = torch.randn(2, 8, device=DEVICE)
    with torch.no_grad():
        assert rowwise.usable(x) == (DEVICE == "cuda")
        assert not rowwise.usable(x, x.new_ones(8, dtype=torch.float64))      # weights of another dtype
    assert not rowwise.usable(x)                                           # gradients wanted


def test_model_forward_with_the_fused_rows_equals_eager(monkeypatch):
    cfg = PRESETS["tiny"]
    model = XLSTMLarge(cfg).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), device=DEVICE)
    with torch.no_grad():
        monkeypatch.setattr(rowwise, "usable", lambda *a: False)
        ref, ref_state = model(ids)
        calls = []
        monkeypatch.setattr(rowwise, "usable", lambda *a: calls.append(1) or True)
        out, state = model(ids)
    assert calls, "the layers never asked for the fused rows"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(state, ref_state):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _xent_reference(z, y, w, cap):
    """Loss per row and dloss/dz in float64 from the same logits (autograd through the formula)."""
    z = z.double().requires_grad_()
    s = cap * torch.tanh(z / cap) if cap else z
    loss = (torch.logsumexp(s, 1) - s.gather(1, y[:, None])[:, 0]) * w.double()
    (g,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), g


# float16 logits on the CPU (the interpreter truncates bf16), bfloat16 on the GPU: the gradient is
# rounded once to the logits' dtype, the loss stays float32
XENT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", XENT_DTYPES)
@pytest.mark.parametrize("cap", [30.0, 3.0, 60.0, None])   # 60: past the fixed shift, a running maximum
@pytest.mark.parametrize("V", [300, 5000])          # one partial block; two blocks of 4096, the second partial
def test_cross_entropy_rows_against_float64(dtype, cap, V):
    g = torch.Generator().manual_seed(V)
    n = 6
    z = (torch.randn(n, V, generator=g) * 8).to(DEVICE, dtype)
    y = torch.randint(0, V, (n,), generator=g).to(DEVICE)
    w = torch.rand(n, generator=g).to(DEVICE)
    w[2] = 0.0                                                   # a row that does not count
    ref_loss, ref_g = _xent_reference(z, y, w, cap)
    loss = rowwise.cross_entropy_rows(z.clone(), y, w, cap, grad=False)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    zg = z.clone()
    loss2 = rowwise.cross_entropy_rows(zg, y, w, cap, grad=True)
    assert torch.equal(loss2, loss)
    assert (zg[2] == 0).all()                                    # weight 0: no gradient
    # the gradient rounded once to the dtype: relative to the row's largest entry
    step = {torch.float32: 2 ** -20, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    if dtype == torch.float32 and cap:
        # float32's rounding of s = cap * tanh(z / cap) is a fraction of the cap, and exp turns it into
        # a relative error of the gradient: 2^-20 holds to cap 30 and grows with the cap beyond
        # (at cap 60 both this kernel and session 13's measured 1.07e-6 on the H200)
        step *= max(1.0, cap / 30)
    err = ((zg.double() - ref_g).abs().amax(1) / ref_g.abs().amax(1).clamp_min(1e-30))
    assert err.max() <= step, f"gradient off by {err.max():.2e} of the row's largest, more than {step:.1e}"


def test_cross_entropy_rows_target_outside_the_vocabulary_is_nan():
    z = torch.randn(3, 10, device=DEVICE)
    y = torch.tensor([1, 10, -3], device=DEVICE)
    loss = rowwise.cross_entropy_rows(z.clone(), y, torch.ones(3, device=DEVICE), 30.0, grad=True)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()


def test_cross_entropy_rows_bad_input():
    z = torch.randn(3, 10, device=DEVICE)
    y = torch.zeros(3, dtype=torch.long, device=DEVICE)
    w = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="unit column stride"):
        rowwise.cross_entropy_rows(z.T, y, w, 30.0, grad=False)
    with pytest.raises(ValueError, match="row_weight"):
        rowwise.cross_entropy_rows(z, y, w.double(), 30.0, grad=False)


@pytest.mark.parametrize("cap", [30.0, None])
def test_lm_head_loss_with_the_row_kernel_equals_the_eager_rows(cap):
    """The chunked LM-head loss with its row kernel against the same loss with the eager passes
    (float32, chunks of 7 rows with a remainder, ignored targets): loss and both gradients."""
    from fastxlstm.loss import lm_head_loss
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(3, 13, 24, generator=g) * 2).to(DEVICE).requires_grad_()
    w = torch.randn(700, 24, generator=g).to(DEVICE).requires_grad_()
    y = torch.randint(0, 700, (3, 13), generator=g).to(DEVICE)
    y[0, :4] = -100
    grads = []
    for kernel in (False, True):
        loss = lm_head_loss(h, w, y, soft_cap=cap, chunk_rows=7, kernel=kernel)
        grads.append((loss, *torch.autograd.grad(loss * 1.3, (h, w))))
    for name, ref, out in zip(("loss", "dh", "dw"), *grads):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
