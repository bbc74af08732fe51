"""Triton sLSTM: autograd wiring and launches for the fused forward and backward kernels.

The recurrent matmul runs in x's dtype (bf16 under autocast: tensor cores; float32 with IEEE
products, so float32 results match the reference to rounding). In bf16 / fp16 the float32 h_{t-1}
enters it as hi + lo, two operands in that dtype (fwd.py says why: one rounding of h flips the
stabiliser's max and with it the gradient routed through m); states, gates and all gradients
of the recurrence are float32. float64 is not supported here (use the native backend).

Each head's R is split over ``cdiv(D, block_n)`` programs that keep their slice on chip and meet
at a global-memory barrier every step (see fwd.py). That barrier needs every program of a launch
resident at once, so a launch holds at most one program per SM: batch tiles beyond that run in
further launches, one after another. Off CUDA (the Triton interpreter runs programs one after
another) the split is 1: one program per (head, batch tile), the same kernel without the barrier.
"""

from __future__ import annotations

import functools

import torch
import triton

from ...state import SLSTMState
from .. import initial_state
from ..reference import slstm_step as _reference_step
from .bwd import slstm_bwd_kernel
from .fwd import slstm_fwd_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# R slice per program (elements of all four gates) the default split aims for: 16 K elements is
# 32 KiB of shared memory in bf16; the dot operands it is read into per step fit in registers
# without spills at 8 warps (benchmarks/slstm_compile.py, sm_90). Slices grow up to twice that to
# bring all batch tiles into one launch.
SLICE_ELEMENTS = 16 * 1024


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(B: int, H: int, D: int, device: torch.device, block_b: int, block_n: int | None,
         num_warps: int) -> dict:
    """Launch shape of one direction: BLOCK_B rows and BLOCK_N units per program, SPLIT programs
    per head, and how many batch tiles one launch may hold (all without a barrier; else as many
    as fit on the SMs, since programs that wait on each other must all be resident)."""
    block_d = max(16, triton.next_power_of_2(D))
    tiles = triton.cdiv(B, block_b)
    if device.type != "cuda":
        if block_n is not None and block_n < D:
            raise ValueError(f"block_n {block_n} < D {D} splits a head over programs that wait on each other: "
                             "CUDA only (the interpreter runs programs one after another)")
        block_n = block_d
    elif block_n is None:
        sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
        block_n = max(16, min(block_d, triton.next_power_of_2(SLICE_ELEMENTS // (4 * block_d))))
        while block_n < block_d and (H * triton.cdiv(D, block_n) > sms or (
                H * triton.cdiv(D, block_n) * tiles > sms and 4 * block_n * block_d <= SLICE_ELEMENTS)):
            block_n *= 2
    split = triton.cdiv(D, block_n)
    per_launch = tiles
    if split > 1:
        sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
        per_launch = sms // (H * split)
        if per_launch < 1:
            raise ValueError(f"{H} heads x {split} programs per head (block_n {block_n}, D {D}) exceed the "
                             f"{sms} SMs that must run them at once; raise block_n")
    # SPLIT (the barrier's group size) is the grid's first axis; a test sets it apart to 1
    return dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, SPLIT=split, programs=split, tiles=tiles,
                per_launch=per_launch, num_warps=num_warps)


def slstm(x, r, state: SLSTMState | None = None, *, forget_gate: str = "sigmoid", block_b: int | None = None,
          block_n: int | None = None, num_warps: int = 8, bwd_block_b: int = 16, bwd_block_n: int | None = None,
          bwd_num_warps: int = 8) -> tuple[torch.Tensor, SLSTMState]:
    """Same contract as ``reference.slstm``. Launch knobs, forward and (bwd_) backward: block_b
    batch rows per program (power of two >= 16, tl.dot's minimum; forward default 16 up to B 16,
    else 32; the backward holds all four gates' dpre rows per step, so 16); block_n hidden units
    per program (power of two >= 16; None: on CUDA a slice of about SLICE_ELEMENTS of R, off CUDA
    all of D); num_warps per program."""
    named = [("x", x), ("r", r)] + [(f"state.{k}", v) for k, v in (state._asdict().items() if state else ())]
    for name, t in named:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"triton sLSTM supports {SUPPORTED_DTYPES}; {name} is {t.dtype}")
    knobs = (("block_b", block_b), ("block_n", block_n), ("bwd_block_b", bwd_block_b), ("bwd_block_n", bwd_block_n))
    for name, v in knobs:
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")
    s0 = initial_state(x, r, state)
    B, _, H, _, D = x.shape
    block_b = block_b or (16 if B <= 16 else 32)
    consts = dict(PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    fwd = {**plan(B, H, D, x.device, block_b, block_n, num_warps), **consts}
    bwd = {**plan(B, H, D, x.device, bwd_block_b, bwd_block_n, bwd_num_warps), **consts}
    h, c, n, m, hT = _SLSTMTriton.apply(x, r, *s0, forget_gate == "exp", fwd, bwd)
    return h, SLSTMState(c, n, m, hT)


def slstm_step(x, r, state: SLSTMState | None = None, *,
               forget_gate: str = "sigmoid") -> tuple[torch.Tensor, SLSTMState]:
    """One decode step: a (B, H, D) update is launch-bound either way; the reference formula serves."""
    return _reference_step(x, r, state, forget_gate=forget_gate)


def launch(kernel, meta: dict, H: int, args: list, **consts):
    """Run the batch tiles in launches of at most meta['per_launch'] tiles (co-residency)."""
    launch_meta = {k: v for k, v in meta.items() if k not in ("programs", "tiles", "per_launch")}
    for tile0 in range(0, meta["tiles"], meta["per_launch"]):
        n = min(meta["per_launch"], meta["tiles"] - tile0)
        kernel[(meta["programs"], H, n)](*args, tile0, **launch_meta, **consts)


class _SLSTMTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, c0, n0, m0, h0, forget_exp: bool, meta: dict, bwd_meta: dict):
        B, T, H, _, D = x.shape
        x = x.contiguous()
        rd = r.to(x.dtype).contiguous()
        c0, n0, m0, h0 = (t.contiguous() for t in (c0, n0, m0, h0))
        save = any(ctx.needs_input_grad[:6])
        f32 = dict(device=x.device, dtype=torch.float32)
        y = torch.empty(B, T, H, D, device=x.device, dtype=x.dtype)
        c, n, m, hT = (torch.empty(B, H, D, **f32) for _ in range(4))
        hbuf = torch.empty(2, B, H, D, **f32)                           # h_t exchange, ping-pong
        counters = torch.zeros(meta["tiles"] * H, device=x.device, dtype=torch.int32)
        if save:
            pre = torch.empty(B, T, H, 4, D, **f32)
            hist = [torch.empty(B, T + 1, H, D, **f32) for _ in range(4)]
        else:
            pre, hist = y, [y] * 4                                  # never written when SAVE is off
        launch(slstm_fwd_kernel, meta, H, [x, rd, c0, n0, m0, h0, y, pre, *hist, c, n, m, hT, hbuf, counters,
                                           B, T, H, D], FORGET_EXP=forget_exp, SAVE=save,
               HILO=rd.dtype != torch.float32)
        if save:
            ctx.save_for_backward(rd, pre, *hist)
        ctx.meta, ctx.forget_exp = bwd_meta, forget_exp
        ctx.x_dtype, ctx.r_dtype = x.dtype, r.dtype
        return y, c, n, m, hT

    @staticmethod
    def backward(ctx, dy, dcT, dnT, dmT, dhT):
        rd, pre, cs, ns, ms, hs = ctx.saved_tensors
        B, T, H, _, D = pre.shape
        zeros = lambda: torch.zeros(B, H, D, device=pre.device, dtype=torch.float32)  # noqa: E731
        dfinal = [g.float().contiguous() if g is not None else zeros() for g in (dcT, dnT, dmT, dhT)]
        dy = dy.contiguous() if dy is not None else torch.zeros(B, T, H, D, device=pre.device)
        dpre = torch.empty_like(pre)
        dinit = [torch.empty(B, H, D, device=pre.device, dtype=torch.float32) for _ in range(4)]
        dbuf = torch.empty(2, B, H, 4, D, device=pre.device, dtype=rd.dtype)   # dpre_t exchange
        counters = torch.zeros(ctx.meta["tiles"] * H, device=pre.device, dtype=torch.int32)
        launch(slstm_bwd_kernel, ctx.meta, H, [rd, pre, cs, ns, ms, dy, *dfinal, dpre, *dinit, dbuf, counters,
                                               B, T, H, D], FORGET_EXP=ctx.forget_exp)
        # dR[h] = sum over (b, t) of h_{t-1}^T dpre_t: one batched matmul per head
        dr = torch.einsum("bthd,bthge->hdge", hs[:, :T], dpre)
        return (dpre.to(ctx.x_dtype), dr.to(ctx.r_dtype), *dinit, None, None, None)
