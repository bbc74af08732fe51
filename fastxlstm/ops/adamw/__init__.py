"""AdamW updates of a list of parameters, with a gradient coefficient folded in (the clip's).

``adamw_(params, grads, exp_avgs, exp_avg_sqs, ..., grad_coef=c)`` updates the parameters and both
moments in place exactly as ``torch.optim.AdamW`` does after ``g.mul_(c)`` for every gradient, but
leaves the gradients as they are: the clip costs no pass over them. Why: in a 1.3b training step on
the H200 the clip's in-place scaling (a read and a write of every float32 gradient) took ~2.7 ms
beside torch's fused AdamW; with the coefficient in the update, the update reads p, g, m and v once
and writes p, m and v (benchmarks/RESULTS.md, fourteenth session).

On CUDA tensors (Triton installed) one Triton launch for the whole list; elsewhere the same
arithmetic in torch ops, which is also the reference the kernel is tested against.
"""

from __future__ import annotations

import math

import torch

from .. import triton_available

__all__ = ["adamw_", "kernel_serves"]


def kernel_serves(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these (a parameter and its gradient, or its states): plain
    contiguous float32 CUDA tensors of one size on one device at 16-byte aligned addresses (the
    kernel loads four floats at once), Triton installed."""
    first = tensors[0]
    return (first.is_cuda and triton_available()
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.numel() == first.numel()
                    and t.device == first.device and t.data_ptr() % 16 == 0 for t in tensors))


@torch.no_grad()
def adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
           exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, beta1: float, beta2: float, eps: float,
           weight_decay: float, grad_coef: torch.Tensor | None = None, kernel: bool | None = None) -> None:
    """AdamW (decoupled weight decay) on each parameter with gradient ``g * grad_coef``; ``step``
    counts this update (1 for the first), the same for all. grad_coef: a float32 scalar tensor on
    the parameters' device, or None for 1; NaN: no update (parameters and moments untouched), how
    a step with non-finite gradients is skipped without the host reading the norm. kernel: None: the Triton kernel where it serves every
    tensor (see kernel_serves); True: also on CPU tensors (under TRITON_INTERPRET=1, for tests);
    False: torch ops."""
    if step < 1:
        raise ValueError(f"step counts updates from 1, got {step}")
    if not len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs):
        raise ValueError(f"{len(params)} parameters need as many gradients ({len(grads)}), exp_avgs "
                         f"({len(exp_avgs)}) and exp_avg_sqs ({len(exp_avg_sqs)})")
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if not (p.shape == g.shape == m.shape == v.shape):
            raise ValueError(f"a parameter {tuple(p.shape)}, its gradient {tuple(g.shape)} and states "
                             f"{tuple(m.shape)} / {tuple(v.shape)} must have one shape")
    if not params:
        return
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    step_size = lr / bias_correction1
    if kernel is None:
        kernel = all(kernel_serves(*t) for t in zip(params, grads, exp_avgs, exp_avg_sqs))
    if kernel:
        from . import triton as kernels                # Triton only where it is used
        kernels.adamw_(params, grads, exp_avgs, exp_avg_sqs, grad_coef, decay=1 - lr * weight_decay, beta1=beta1,
                       beta2=beta2, eps=eps, step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt)
        return
    if grad_coef is not None and torch.isnan(grad_coef):          # torch's path reads it (a sync on CUDA)
        return
    for p, g, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        # torch.optim.AdamW's single-tensor update, in its order of operations
        if grad_coef is not None:
            g = g * grad_coef.to(g.dtype)
        p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
