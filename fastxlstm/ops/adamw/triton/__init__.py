"""The Triton kernel of ops.adamw: one launch for a list of parameters. A table of their four
pointers (parameter, gradient, exp_avg, exp_avg_sq) and a map from program to parameter let each
program update BLOCK elements of one of them; one launch per step, where a launch per parameter
(363 in the 1.3b preset) left the update bound by the host's launch time."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["adamw_", "BLOCK"]

# 1.3b preset's 363 tensors on the H200: 12.7-13.1 ms a step at 1024, 2048 or 8192, 14.3 at 4096 (run 103)
BLOCK = 2048


@functools.lru_cache(maxsize=16)
def _block_map(numels: tuple[int, ...], block: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(numels, each tensor's first program, each program's tensor) on the device, for a list of
    tensor sizes (the same every step, so built once)."""
    n = torch.tensor(numels, dtype=torch.int64)
    blocks = (n + block - 1) // block
    first = torch.cumsum(blocks, 0) - blocks
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    return n.to(device), first.to(torch.int32).to(device), owner.to(device)


@functools.lru_cache(maxsize=4)
def _pointer_table(pointers: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The tensors' addresses on the device. Cached by value: the caching allocator hands the
    gradients the same addresses step after step, so the table is uploaded once, not every step.
    From pinned memory the upload is asynchronous (from pageable memory it would wait for the
    stream, i.e. the backward); torch's pinned-memory cache reuses the buffer once the copy ran."""
    table = torch.tensor(pointers, dtype=torch.int64)
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def adamw_(params, grads, exp_avgs, exp_avg_sqs, grad_coef, *, decay, beta1, beta2, eps, step_size,
           bias_correction2_sqrt):
    numels = tuple(p.numel() for p in params)
    if not sum(numels):
        return
    device = params[0].device
    n, first, owner = _block_map(numels, BLOCK, device)
    table = _pointer_table(tuple(t.data_ptr() for group in zip(params, grads, exp_avgs, exp_avg_sqs)
                                 for t in group), device)
    coef = grad_coef if grad_coef is not None else params[0]      # unread without HAS_COEF
    _adamw_kernel[(owner.numel(),)](
        table, n, first, owner, coef, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
        HAS_COEF=grad_coef is not None, BLOCK=BLOCK, num_warps=8)


@triton.jit
def _adamw_kernel(table, numels, first_block, owner, coef_ptr, decay, beta1, beta2, eps, step_size, bc2_sqrt,
                  HAS_COEF: tl.constexpr, BLOCK: tl.constexpr):
    """torch.optim.AdamW's update of one block of one tensor, in float32: p *= 1 - lr wd;
    m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2;
    p -= step_size m / (sqrt(v) / sqrt(1 - beta2^t) + eps). The square root and the division
    round as torch's do (IEEE), not approximately. A NaN gradient coefficient leaves all untouched."""
    pid = tl.program_id(0)
    t = tl.load(owner + pid)
    n = tl.load(numels + t)
    row = table + 4 * t.to(tl.int64)       # 16-byte aligned addresses (ops.adamw.kernel_serves): vector loads
    p_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.float32)), 16)
    g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.float32)), 16)
    m_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(tl.float32)), 16)
    v_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(tl.float32)), 16)
    start = (pid - tl.load(first_block + t)).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    coef = tl.load(coef_ptr) if HAS_COEF else 1.0
    if coef == coef:                       # a NaN coefficient (non-finite gradients): no update at all
        if start + BLOCK <= n:             # a whole block: no mask, whose bound would stop vector loads
            _update(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n, coef, decay, beta1, beta2, eps, step_size,
                    bc2_sqrt, MASKED=False)
        else:
            _update(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n, coef, decay, beta1, beta2, eps, step_size,
                    bc2_sqrt, MASKED=True)


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, v_ptr, offs, ok, coef, decay, beta1, beta2, eps, step_size, bc2_sqrt,
            MASKED: tl.constexpr):
    if MASKED:
        g = tl.load(g_ptr + offs, mask=ok, other=0.0)
        p = tl.load(p_ptr + offs, mask=ok, other=0.0)
        m = tl.load(m_ptr + offs, mask=ok, other=0.0)
        v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    else:
        g = tl.load(g_ptr + offs)
        p = tl.load(p_ptr + offs)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    g = g * coef
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)                       # torch's lerp for weights below 1/2
    v = v * beta2 + (1.0 - beta2) * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    if MASKED:
        tl.store(p_ptr + offs, p, mask=ok)
        tl.store(m_ptr + offs, m, mask=ok)
        tl.store(v_ptr + offs, v, mask=ok)
    else:
        tl.store(p_ptr + offs, p)
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
