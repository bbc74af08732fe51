"""Cross-entropy of a language model head over hidden states, in row chunks: never the (N, vocab) logits.

``lm_head_loss(h, weight, targets, soft_cap=30)`` equals

    F.cross_entropy(soft_cap(h @ weight.T).float(), targets, ignore_index=-100)

with soft_cap(z) = cap * tanh(z / cap), but holds the logits of ``chunk_rows`` rows at a time. At
8 x 4096 tokens and a 50304 vocabulary the full float32 logits are 6.6 GB, their gradient as much
again, and the soft cap and the cross-entropy each add a pass over them; here the peak is a few
chunk-sized buffers.

The forward pass also computes both gradients, chunk by chunk, while the chunk's logits are at hand
(the LM-head matmul is not repeated): dL/dh (N, E) and dL/dW (V, E), accumulated in float32. The
backward only scales them by the incoming gradient, so it is exact (the chain rule, not an
approximation); under ``torch.no_grad`` or for inputs that need no gradient nothing is kept.

Precision follows what the unfused path does under autocast: the matmuls run in the autocast dtype
(bf16) or in the inputs' dtype outside autocast; the soft cap, the log-softmax and the gradient of
the logits run in float32 (float64 for float64 inputs).

On CUDA the work between the matmuls (soft cap, log-softmax, the logits' gradient) is one Triton
kernel per chunk (ops.rowwise.cross_entropy_rows): it reads the matmul's logits and writes their
gradient over them, in the matmul dtype, with the same float32 arithmetic in registers. Eagerly it
is about ten float32 passes over the chunk: a compiled 1.3b training step at 4 x 4096 tokens on the
H200 takes 288-291 ms with the kernel against 304-306 ms without (benchmarks/RESULTS.md, run 30).
"""

from __future__ import annotations

import functools

import torch

from .ops import rowwise, triton_available

IGNORE_INDEX = -100


def lm_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, soft_cap: float | None = None,
                 ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                 chunk_rows: int | None = None, kernel: bool | None = None) -> torch.Tensor:
    """Cross-entropy of soft-capped logits ``h @ weight.T`` against ``targets``, chunked over rows.

    Args:
        h: (..., E) hidden states (the final normed ones), any float dtype.
        weight: (V, E) LM-head weight (no bias).
        targets: (...) integer ids in [0, V), or ``ignore_index`` for rows that do not count.
        soft_cap: cap of cap * tanh(z / cap) on the logits; None or 0 for none.
        reduction: 'mean' over the counted rows (NaN when none counts, as F.cross_entropy) or 'sum'.
        chunk_rows: rows per chunk; default: even chunks whose float32 logits stay under 4 GiB with
            the row kernel, which works in place on the matmul's logits (under 512 MiB for the
            eager passes, which make float32 temporaries).
        kernel: the row kernel for the work between the matmuls; None: on CUDA where Triton is
            installed and the matmul dtype is float32, bfloat16 or float16; True: also on CPU tensors
            (under TRITON_INTERPRET=1, for tests); False: never.
    Returns:
        a scalar float32 loss (float64 for float64 inputs).
    """
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"h {tuple(h.shape)} and targets {tuple(targets.shape)} must agree on all but h's last dim")
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must be (vocab, {h.shape[-1]}), got {tuple(weight.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dev = h.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    if compute not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        compute = h.dtype
    if kernel is None:
        kernel = h.is_cuda and triton_available()
    kernel = kernel and compute in (torch.float32, torch.bfloat16, torch.float16)
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(targets.numel(), weight.shape[0], kernel)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    cap = float(soft_cap) if soft_cap else 0.0
    # needs_input_grad says True under no_grad too: pass the grad mode, so evaluation keeps no gradients
    return _LMHeadLoss.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), cap, ignore_index,
                             reduction == "mean", chunk_rows, compute, torch.is_grad_enabled(), kernel)


def _default_chunk_rows(rows: int, vocab: int, kernel: bool) -> int:
    """Rows per chunk: as few chunks as the budget allows, of even size (a multiple of 128). Fewer,
    larger chunks make larger GEMMs: a 1.3b 8 x 4096 compiled step on the H200 took 516-517 ms in
    two chunks of 16384 rows against 518-520 in 2560-row chunks, for 2.3 GiB more at the peak
    (benchmarks/RESULTS.md, fourteenth session)."""
    budget = (4 << 30) if kernel else (512 << 20)              # bytes of float32 logits a chunk
    chunks = max(1, -(-rows * vocab * 4 // budget))
    return max(128, -(-rows // chunks // 128) * 128) if rows > 128 else max(rows, 1)


class _LMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, cap, ignore_index, mean, chunk_rows, compute, grad_mode, kernel):
        want_dh, want_dw = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
        grad = want_dh or want_dw
        acc = torch.float64 if compute == torch.float64 else torch.float32   # soft cap / softmax dtype
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(compute)
            valid = targets != ignore_index
            count = valid.sum().to(acc)
            # mean: each counted row weighs 1/count (the loss is NaN when none counts, as in torch)
            scale = 1.0 / count.clamp_min(1) if mean else torch.ones((), dtype=acc, device=h.device)
            row_weight = valid.to(acc) * scale                   # ignored rows: no loss, no gradient
            total = torch.zeros((), dtype=acc, device=h.device)
            dh = torch.empty_like(h) if want_dh else None
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_dw else None
            # passes over a chunk's (n, V) logits are the cost beside the matmuls
            for lo in range(0, h.shape[0], chunk_rows):
                hc = h[lo:lo + chunk_rows].to(compute)
                y = torch.where(valid[lo:lo + chunk_rows], targets[lo:lo + chunk_rows], 0).unsqueeze(1)
                z = hc @ w.T                                     # (n, V): the logits in the matmul's rounding
                rw = row_weight[lo:lo + chunk_rows]
                if kernel:                                       # the gradient over the logits, in place
                    total += rowwise.cross_entropy_rows(z, y[:, 0], rw, cap, grad).sum()
                    gc = z
                else:
                    loss, gc = _eager_rows(z, y, rw, cap, acc, grad, compute)
                    total += loss
                if want_dh:
                    dh[lo:lo + chunk_rows] = gc @ w
                if want_dw:
                    _add_matmul_(dw, gc.T, hc)
            if mean:
                total = total * (count / count)                  # NaN when no row counts, as F.cross_entropy
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        dh = dh * grad.to(dh.dtype) if dh is not None else None
        dw = (dw * grad.to(dw.dtype)).to(ctx.weight_dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None, None, None, None


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b. With a, b narrower than acc on CUDA, the GEMM accumulates into acc itself (cuBLAS
    beta = 1, ``addmm(..., out_dtype=)``): no rounding of a @ b to a's dtype and no second pass over
    acc, which for the LM head's (V, E) float32 gradient is ~1 GB of traffic per chunk."""
    if acc.dtype != a.dtype and acc.is_cuda and _accumulates_in_place(acc.device, a.dtype, acc.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


@functools.cache
def _accumulates_in_place(device: torch.device, low: torch.dtype, acc: torch.dtype) -> bool:
    """Whether this torch accumulates a ``low`` GEMM into an ``acc`` tensor in place (addmm's
    out_dtype, torch >= 2.8 on CUDA), checked once on a tiny case against the two-pass result."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(8, 8, device=device, generator=g).to(low) for _ in range(2))
        c = torch.randn(8, 8, device=device, generator=g, dtype=acc)
        want = c + a.to(acc) @ b.to(acc)
        torch.addmm(c, a, b, out_dtype=acc, out=c)
        return bool(torch.allclose(c, want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError):
        return False


def _eager_rows(z, y, row_weight, cap, acc, grad, compute):
    """The kernel's work in torch ops: the chunk's weighted loss (in ``acc``) and the logits'
    gradient in the matmul dtype (None without ``grad``). Each step is one pass over the (n, V)
    chunk, in place where the value is not needed again."""
    rw = row_weight.unsqueeze(1)                             # (n, 1)
    z = z.to(acc)
    if cap:
        t = z.div_(cap).tanh_()                              # keep tanh for the cap's derivative 1 - t^2
        s = t * cap
    else:
        t, s = None, z
    top = s.amax(dim=1, keepdim=True)                        # (n, 1)
    picked = s.gather(1, y)
    e = s.sub_(top).exp_()                                   # exp(s - max), in s's buffer
    sum_e = e.sum(dim=1, keepdim=True)
    loss = ((top + sum_e.log() - picked) * rw).sum()
    if not grad:
        return loss, None
    g = e.mul_(rw / sum_e)                                   # softmax, weighted per row
    g.scatter_add_(1, y, -rw)                                # minus the weighted one-hot of the target
    if cap:
        g = torch.addcmul(g, g, t.mul_(t), value=-1, out=t)  # (1 - t^2) * g
    return loss, g.to(compute)
