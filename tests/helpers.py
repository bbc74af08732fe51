"""Shared test helpers: one tolerance table keyed by dtype, one comparison, one input maker."""

from __future__ import annotations

import math

import torch

# Relative RMSE (fla's metric) and max-abs bound relative to the reference's max-abs, per input dtype.
# float64: both forms are exact math, so only rounding of long sums remains.
# float32: a few ulps accumulated over chunk sums; tf32 dots on GPU land near 3e-4.
# bfloat16/float16: 8- and 11-bit mantissas on the inputs and on the matmul operands.
TOL = {
    torch.float64: dict(rmse=1e-10, max_abs=1e-10),
    torch.float32: dict(rmse=1e-5, max_abs=1e-4),
    "tf32": dict(rmse=2e-3, max_abs=1e-2),
    # float32 through the mLSTM denominator: h = num/den and the gradients dh/den, (dh . h)/den
    # amplify rounding where den = |n . q| cancels or sits near its floor exp(-m). Measured on the
    # CPU (T=63, 20 seeds): native chunkwise fp32 h lands at 1.1e-5..2.5e-5 rel-RMSE against
    # float64, the fp32 recurrent loop up to 7.7e-5 (that one also amplifies along the sequence);
    # native autograd fp32 gradients at 1.5e-5 (T=70).
    "float32_den": dict(rmse=5e-5, max_abs=2e-4),
    torch.float16: dict(rmse=5e-3, max_abs=3e-2),
    torch.bfloat16: dict(rmse=2e-2, max_abs=8e-2),
}


def rel_errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(relative RMSE, max-abs error / max-abs of ref), computed in float64."""
    ref, out = ref.detach().double(), out.detach().double()
    scale = ref.abs().max().clamp_min(1e-30)
    rmse = ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    return rmse, ((ref - out).abs().max() / scale).item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, dtype, floor=None) -> None:
    """Fail with both error figures when ``out`` is not ``ref`` to the tolerance of ``dtype``.

    ``floor`` (rel-RMSE, rel max-abs) is the error of the same formula evaluated plainly in the
    same dtype (native autograd) on the same inputs: where the inputs are so ill-conditioned that
    exact arithmetic in that dtype misses the table, ``out`` may be up to 3x that, no worse."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    tol = dict(TOL[dtype])
    if floor is not None and all(math.isfinite(x) for x in floor):
        tol = dict(rmse=max(tol["rmse"], 3 * floor[0]), max_abs=max(tol["max_abs"], 3 * floor[1]))
    rmse, max_abs = rel_errors(ref, out)
    assert rmse <= tol["rmse"] and max_abs <= tol["max_abs"], (
        f"{name}: rel-RMSE {rmse:.3e} (tol {tol['rmse']:.1e}), rel max-abs {max_abs:.3e} "
        f"(tol {tol['max_abs']:.1e}) for {dtype}")


def make_mlstm_inputs(B, T, H, Dqk, Dv, *, dtype=torch.float64, device="cpu", gate_scale=3.0,
                      with_state=False, requires_grad=False, generator=None):
    """Fresh random q, k, v, i, f (and an initial state) in the ops layout."""
    from fastxlstm.ops import MLSTMState

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        t = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift
        return t.to(device=device, dtype=dt).requires_grad_(requires_grad)

    x = (rnd(B, T, H, Dqk), rnd(B, T, H, Dqk), rnd(B, T, H, Dv),
         rnd(B, T, H, scale=gate_scale), rnd(B, T, H, scale=gate_scale, shift=2.0))
    state = None
    if with_state:
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        state = MLSTMState(rnd(B, H, Dqk, Dv, dt=sdt), rnd(B, H, Dqk, dt=sdt), rnd(B, H, scale=2.0, dt=sdt))
    return x, state


def poison_allocations(monkeypatch) -> None:
    """Fill every fresh allocation (torch.empty, empty_like, Tensor.new_empty) with NaN, so an
    output element that no kernel wrote fails the comparison."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: nan(new_empty(self, *a, **kw)))
