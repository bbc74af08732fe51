"""fastxlstm.optim.AdamW: clip_and_step equals clip_grad_norm_ + torch.optim.AdamW.step, on the
Triton kernel's path (under TRITON_INTERPRET=1 without a GPU) and on torch's, with two weight-decay
groups, a changing learning rate, and state dicts that move between the two optimizers."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fastxlstm.ops import adamw as adamw_op  # noqa: E402
from fastxlstm.optim import AdamW  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    # sizes around the kernel's block (4096): a partial block, several blocks, a scalar-like one
    return [torch.randn(*shape, generator=g).to(DEVICE).requires_grad_() for shape in ((70, 130), (5000,), (3,))]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * (3.0 if step % 2 else 0.01)).to(DEVICE)


def _run(opt_cls, params, steps, max_norm, **kw):
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
    opt = opt_cls(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    norms, grads = [], []
    for s in range(steps):
        _set_grads(params, s)
        if opt_cls is AdamW:
            norms.append(opt.clip_and_step(max_norm))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
            opt.step()
        grads.append([p.grad.clone() for p in params])
        sched.step()
    return opt, norms, grads


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("max_norm", [1.0, math.inf])     # odd steps clip (norm ~ 200), even ones do not
def test_clip_and_step_equals_torch(kernel, max_norm):
    ours_p, ref_p = _params(), _params()
    ours, ours_norms, ours_grads = _run(AdamW, ours_p, 4, max_norm, kernel=kernel)
    ref, ref_norms, ref_grads = _run(torch.optim.AdamW, ref_p, 4, max_norm)
    for a, b in zip(ours_norms, ref_norms):
        torch.testing.assert_close(a, b)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b)                              # float32 tolerances
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[a][key], ref.state[b][key])
        assert float(ours.state[a]["step"]) == float(ref.state[b]["step"]) == 4
    # the kernel leaves the gradients unscaled; torch's path scales them, as clip_grad_norm_ does
    s, want = 1, ours_norms[1]                                         # a clipping step when max_norm is 1
    if kernel and math.isfinite(max_norm):
        assert not torch.allclose(ours_grads[s][0], ref_grads[s][0])
        torch.testing.assert_close(ours_grads[s][0] * (max_norm / (want + 1e-6)), ref_grads[s][0])
    else:
        torch.testing.assert_close(ours_grads[s][0], ref_grads[s][0])


@pytest.mark.parametrize("kernel", [True, False])
def test_state_dict_moves_between_ours_and_torch(kernel):
    """Two steps with ours, the state into torch.optim.AdamW for the third, against three steps
    with ours; and the reverse direction."""
    for first, second in ((AdamW, torch.optim.AdamW), (torch.optim.AdamW, AdamW)):
        a_p, b_p = _params(1), _params(1)
        kw = lambda cls: {"kernel": kernel} if cls is AdamW else {}
        straight, _, _ = _run(AdamW, a_p, 3, 1.0, kernel=kernel)
        mid, _, _ = _run(first, b_p, 2, 1.0, **kw(first))
        groups = [{"params": b_p[:2], "weight_decay": 0.1}, {"params": b_p[2:], "weight_decay": 0.0}]
        cont = second(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw(second))
        cont.load_state_dict(mid.state_dict())
        for group in cont.param_groups:
            group["lr"] = 1e-2 / 3                                    # the schedule's third step
        _set_grads(b_p, 2)
        if second is AdamW:
            cont.clip_and_step(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(b_p, 1.0)
            cont.step()
        for a, b in zip(a_p, b_p):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", [True, False])
def test_parameters_with_different_step_counts(kernel):
    """A parameter without a gradient in the first step lags a step behind the others of its
    group: each gets its own bias correction, as in torch."""
    results = []
    for cls in (AdamW, torch.optim.AdamW):
        params = _params(3)
        opt = cls([{"params": params, "weight_decay": 0.1}], lr=1e-2, **({"kernel": kernel} if cls is AdamW else {}))
        for s in range(3):
            _set_grads(params, s)
            if s == 0:
                params[1].grad = None
            if cls is AdamW:
                opt.clip_and_step(1.0)
            else:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
                opt.step()
        results.append((params, [float(opt.state[p]["step"]) for p in params]))
    (ours, ours_steps), (ref, ref_steps) = results
    assert ours_steps == ref_steps == [3.0, 2.0, 3.0]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_step_with_non_finite_gradients_is_skipped(kernel, bad):
    """One gradient entry NaN or inf: no parameter and no moment changes, the skip is counted, and
    the next finite step updates as usual (the streak back at 0)."""
    params = _params(4)
    opt = AdamW([{"params": params, "weight_decay": 0.1}], lr=1e-2, kernel=kernel)
    _set_grads(params, 0)
    opt.clip_and_step(1.0)
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    _set_grads(params, 1)
    params[1].grad[7] = bad
    norm = opt.clip_and_step(1.0)
    assert not torch.isfinite(norm)
    for p, b, m in zip(params, before, moments):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["exp_avg"], m)
    assert int(opt.skipped_steps) == 1 and int(opt.skipped_streak) == 1
    _set_grads(params, 2)
    opt.clip_and_step(1.0)
    assert all(torch.isfinite(p).all() and not torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert int(opt.skipped_steps) == 1 and int(opt.skipped_streak) == 0


def test_adamw_op_bad_input():
    p = torch.zeros(4)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="step counts updates from 1"):
        adamw_op.adamw_([p], [p], [p.clone()], [p.clone()], step=0, **kw)
    with pytest.raises(ValueError, match="one shape"):
        adamw_op.adamw_([p], [torch.zeros(5)], [p.clone()], [p.clone()], step=1, **kw)
    with pytest.raises(ValueError, match="as many gradients"):
        adamw_op.adamw_([p, p], [p], [p.clone()], [p.clone()], step=1, **kw)


@pytest.mark.gpu
def test_kernel_serves_cuda_training_and_matches_fused_torch():
    params = _params(2)
    assert all(adamw_op.kernel_serves(p, torch.zeros_like(p)) for p in params)
    assert not adamw_op.kernel_serves(params[0], params[0].detach().T.contiguous().T)   # a strided gradient
    ours_p, ref_p = _params(2), _params(2)
    ours, _, _ = _run(AdamW, ours_p, 4, 1.0)
    ref, _, _ = _run(torch.optim.AdamW, ref_p, 4, 1.0, fused=True)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b)
