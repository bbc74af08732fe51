"""The Triton kernels of ops.rowwise (see there): one program per row (RMSNorm, cross-entropy), per
block of head rows (head norm x gate) or per block of elements (silu x up)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
try:  # programmatic dependent launch: triton >= 3.3 (torch 2.5 / 2.6 ship older ones)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_PDL = True
except ImportError:
    gdc_launch_dependents = gdc_wait = None     # never reached: PDL is a constexpr False then
    _HAS_PDL = False

__all__ = ["add_rms_norm", "gated_head_norm", "silu_mul", "silu_mul_backward", "cross_entropy_rows", "CONFIG"]

# pdl: launch the row kernels of the hybrid decode step (add_rms_norm, silu_mul) with programmatic
# dependent launch (sm_90+), so that each may start while the GEMM before it drains: 7B batch-16
# decode 2,857-2,861 against 2,832-2,834 tokens/s without (run 33, H200, one process, interleaved)
CONFIG = dict(pdl=True)


def use_pdl(t: torch.Tensor, enabled: bool = True) -> bool:
    """Whether a launch on t's device may use programmatic dependent launch."""
    return (enabled and _HAS_PDL and t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    if PDL:
        gdc_wait()                    # the previous kernel is done and its writes are visible
        gdc_launch_dependents()       # the next kernel may start filling SMs as this one drains


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # rows of E: one program each (E <= a few thousand fits one block)
    E = x.shape[-1]
    xr = x.reshape(-1, E).contiguous()       # the kernel's rows are E apart (a slice's may not be)
    yr = xr if y is None else y.reshape(-1, E).contiguous()
    s = xr if y is None else torch.empty_like(xr)
    out = torch.empty_like(xr)
    pdl = use_pdl(xr, CONFIG["pdl"])
    _add_rms_norm_kernel[(xr.shape[0],)](
        xr, yr, weight, bias if bias is not None else weight, s, out, eps, E,
        HAS_Y=y is not None, HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(E), PDL=pdl, num_warps=8,
        **({"launch_pdl": True} if pdl else {}))
    return s.view(x.shape), out.view(x.shape)


def gated_head_norm(h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    # rows of Dv (one per token and head), up to 16 per program
    B, T, H, D = h.shape
    hr = h.reshape(-1, D).contiguous()
    orr = o.reshape(-1, D).contiguous()
    out = torch.empty_like(orr)
    rows = hr.shape[0]
    BLOCK = triton.next_power_of_2(D)
    ROWS = max(1, min(16, 4096 // BLOCK))
    _gated_head_norm_kernel[(triton.cdiv(rows, ROWS),)](
        hr, orr, weight, bias if bias is not None else weight, out, eps, rows, H, D,
        HAS_BIAS=bias is not None, ROWS=ROWS, BLOCK=BLOCK, num_warps=4)
    return out.view(B, T, H * D)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # rows of any stride (the two halves of one (B, 2F) projection need no copy)
    F = gate.shape[-1]
    g, u = gate.reshape(-1, F), up.reshape(-1, F)
    g, u = (t if t.stride(-1) == 1 else t.contiguous() for t in (g, u))
    out = torch.empty(g.shape, device=g.device, dtype=g.dtype)
    n = out.numel()
    pdl = use_pdl(out, CONFIG["pdl"])
    _silu_mul_kernel[(triton.cdiv(n, 2048),)](g, u, out, n, F, g.stride(0), u.stride(0), BLOCK=2048, PDL=pdl,
                                              num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return out.view(gate.shape)


def silu_mul_backward(da: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # y = [g | u] (..., 2F) contiguous; the gradient of both halves into one (..., 2F) tensor
    F = da.shape[-1]
    dy = torch.empty_like(y)
    n = da.numel()
    _silu_mul_bwd_kernel[(triton.cdiv(n, 2048),)](da.contiguous(), y, dy, n, F, BLOCK=2048, num_warps=4)
    return dy


def cross_entropy_rows(z: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor, cap: float,
                       grad: bool) -> torch.Tensor:
    # rows of the vocabulary: one program each, streaming the row in blocks (twice when grad)
    n, V = z.shape
    loss = torch.empty(n, device=z.device, dtype=torch.float32)
    BLOCK = min(4096, triton.next_power_of_2(V))
    cap = float(cap or 0.0)
    _cross_entropy_kernel[(n,)](z, targets, row_weight, loss, V, z.stride(0), cap or 1.0, 1.0 / (cap or 1.0),
                                CAP=bool(cap), FIXED_SHIFT=0 < cap <= _MAX_FIXED_SHIFT, GRAD=grad,
                                FAST=os.environ.get("TRITON_INTERPRET") != "1", BLOCK=BLOCK, num_warps=8)
    return loss


# capped logits lie in [-cap, cap]: exp(s - cap) then stays a normal float32 (>= exp(-2 cap) > 2^-126)
# for any cap up to this, so the row's sum needs no running maximum
_MAX_FIXED_SHIFT = 40.0


@triton.jit
def _tanh_near0(a):
    # tanh(a) for 0 <= a < 1/8 by its odd series to a^7, exact to fp32 there, where (1 - e) / (1 + e)
    # with e = exp(-2a) cancels
    a2 = a * a
    return a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))


@triton.jit
def _tanh(x):
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = tl.where(a < 0.125, _tanh_near0(a), (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    # the hardware's ex2 without the subnormal fix-ups tl.exp2 wraps it in (flushed to 0 is what
    # every caller wants); the interpreter runs no PTX
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.exp2(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    # 1 / x to 1 ulp in one instruction, where `/` expands to a division with range checks
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return 1.0 / x


@triton.jit
def _capped(z, cap, inv_cap, CAP: tl.constexpr, FAST: tl.constexpr):
    """(s, ds/dz): the soft-capped logits cap * tanh(z / cap) and 1 - tanh(z / cap)^2 (z itself
    without a cap; the slope then unused). With e = exp(-2 |x|), x = z / cap: tanh = (1 - e) / (1 + e),
    except near 0 where that cancels (there _tanh_near0, as in _tanh); the slope as 4 e / (1 + e)^2,
    since 1 - t^2 from a rounded t cancels where t nears 1, which is where a small cap puts most logits. Two special-function instructions per element: the kernel is bound
    by them, not by memory."""
    if CAP:
        x = z * inv_cap
        a = tl.abs(x)
        e = _exp2(a * (-2.0 * 1.4426950408889634), FAST)    # exp(-2 |x|)
        r = _rcp(1.0 + e, FAST)
        near0 = a < 0.125
        t = tl.where(near0, _tanh_near0(a), (1.0 - e) * r)
        t = tl.where(x < 0, -t, t)
        return t * cap, tl.where(near0, 1.0 - t * t, 4.0 * e * r * r)
    return z, z


@triton.jit
def _cross_entropy_kernel(z_ptr, y_ptr, rw_ptr, loss_ptr, V, ld, cap, inv_cap, CAP: tl.constexpr,
                          FIXED_SHIFT: tl.constexpr, GRAD: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    """One row: loss = (logsumexp(s) - s[y]) * w with s the capped logits, in float32; with GRAD the
    row is overwritten by dloss/dz = w * (softmax(s) - onehot(y)) * ds/dz, in z's dtype. FIXED_SHIFT
    (a cap up to _MAX_FIXED_SHIFT): the sum is of exp(s - cap), no running maximum."""
    LOG2E: tl.constexpr = 1.4426950408889634
    r = tl.program_id(0).to(tl.int64)
    row = z_ptr + r * ld
    col = tl.arange(0, BLOCK)
    if FIXED_SHIFT:
        top = cap
    else:
        top = -float("inf")
    total = 0.0
    for lo in range(0, V, BLOCK):                   # the sum of exp(s - top), top the (running) shift
        ok = lo + col < V
        s, _ = _capped(tl.load(row + lo + col, mask=ok, other=0.0).to(tl.float32), cap, inv_cap, CAP, FAST)
        if FIXED_SHIFT:
            total += tl.sum(tl.where(ok, _exp2((s - top) * LOG2E, FAST), 0.0), 0)
        else:
            s = tl.where(ok, s, -float("inf"))
            new_top = tl.maximum(top, tl.max(s, 0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(s - new_top), 0)
            top = new_top
    y = tl.load(y_ptr + r)
    w = tl.load(rw_ptr + r)
    inside = (y >= 0) & (y < V)                     # a target outside the vocabulary: NaN, never a stray read
    picked, _ = _capped(tl.load(row + tl.where(inside, y, 0)).to(tl.float32), cap, inv_cap, CAP, FAST)
    tl.store(loss_ptr + r, tl.where(inside, (top + tl.log(total) - picked) * w, float("nan")))
    if GRAD:
        scale = w / total
        for lo in range(0, V, BLOCK):
            ok = lo + col < V
            s, slope = _capped(tl.load(row + lo + col, mask=ok, other=0.0).to(tl.float32), cap, inv_cap, CAP,
                               FAST)
            g = _exp2((s - top) * LOG2E, FAST) * scale
            g = tl.where(lo + col == y, g - w, g)
            if CAP:
                g = g * slope
            tl.store(row + lo + col, g.to(z_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, s_ptr, out_ptr, eps, E, HAS_Y: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64) * E
    col = tl.arange(0, BLOCK)
    ok = col < E
    x = tl.load(x_ptr + row + col, mask=ok, other=0.0)
    if HAS_Y:
        x = (x.to(tl.float32) + tl.load(y_ptr + row + col, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + row + col, x, mask=ok)
    xf = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / E + eps)
    y = (xf * r).to(x.dtype).to(tl.float32) * tl.load(w_ptr + col, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y.to(x.dtype).to(tl.float32) + tl.load(b_ptr + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + col, y.to(x.dtype), mask=ok)

@triton.jit
def _gated_head_norm_kernel(h_ptr, o_ptr, w_ptr, b_ptr, out_ptr, eps, rows, H, D, HAS_BIAS: tl.constexpr,
                            ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK)
    ok = (r < rows)[:, None] & (col < D)[None, :]
    off = r[:, None] * D + col[None, :]
    hv = tl.load(h_ptr + off, mask=ok, other=0.0)
    hf = hv.to(tl.float32)
    xc = tl.where(ok, hf - (tl.sum(hf, 1) / D)[:, None], 0.0)
    rs = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    wcol = (r % H)[:, None] * D + col[None, :]          # the flat (H * Dv) weight
    y = (xc * rs[:, None]).to(hv.dtype).to(tl.float32) * tl.load(w_ptr + wcol, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y.to(hv.dtype).to(tl.float32) + tl.load(b_ptr + wcol, mask=ok, other=0.0).to(tl.float32)
    y = y.to(hv.dtype).to(tl.float32)
    o = tl.load(o_ptr + off, mask=ok, other=0.0).to(tl.float32)
    gate = (1.0 / (1.0 + tl.exp(-o))).to(hv.dtype).to(tl.float32)
    tl.store(out_ptr + off, (gate * y).to(hv.dtype), mask=ok)

@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, F, g_row, u_row, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_enter(PDL)
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < n
    row = off // F
    col = off - row * F
    gv = tl.load(g_ptr + row * g_row + col, mask=ok, other=0.0)
    g = gv.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gv.dtype).to(tl.float32)
    up = tl.load(u_ptr + row * u_row + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (act * up).to(gv.dtype), mask=ok)


@triton.jit
def _silu_mul_bwd_kernel(da_ptr, y_ptr, dy_ptr, n, F, BLOCK: tl.constexpr):
    """dg, du of a = silu(g) * u, rounded where eager autograd rounds: du = da * silu(g) and
    ds = da * u in the input dtype, then dg = ds * silu'(g) from float32."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < n
    row = off // F
    col = off - row * F
    gi = row * (2 * F) + col
    gv = tl.load(y_ptr + gi, mask=ok, other=0.0)
    dt: tl.constexpr = gv.dtype
    g = gv.to(tl.float32)
    u = tl.load(y_ptr + gi + F, mask=ok, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + off, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    act = (g * sig).to(dt).to(tl.float32)
    ds = (da * u).to(dt).to(tl.float32)
    tl.store(dy_ptr + gi, (ds * sig * (1.0 + g * (1.0 - sig))).to(dt), mask=ok)
    tl.store(dy_ptr + gi + F, (da * act).to(dt), mask=ok)
