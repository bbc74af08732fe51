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
