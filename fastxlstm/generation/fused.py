"""A fused one-token decode step for XLSTMLarge: ``FusedStep(model)(ids (B, 1), state)`` returns what
``model(ids, state)`` returns (logits (B, 1, V), the new state), to the model dtype's rounding.

Why: the model's step is ~35 kernels per block (six input projections, norms in float32 with
casts, soft caps, residual adds), ~1100 launches per 7B token; inside a CUDA graph the gaps between
them, not the weight reads, set the speed at batch 1. Here each block is

    [residual add + RMSNorm]  ONE GEMM for q|k|v|o|i|f  [split, gate soft caps]        (_mlstm_in)
    mlstm_step (the Triton step kernel on CUDA)
    [head norm x sigmoid(o)]  out_proj  [residual add + RMSNorm]  ONE GEMM for gate|up
    [silu(gate) x up]  proj_down                                                    (_mlstm_out_ffn)

with the FFN's residual add done by the next block's _mlstm_in (or the head). On CUDA the two
pieces run through torch.compile, which fuses each bracket into one kernel; on the CPU they run
eagerly (exactly the model's arithmetic, only the GEMMs are concatenated).

Memory: the concatenated input and gate|up weights are a copy, built when the step is made and
freed with it (the engine builds one per decode call): for the 7B, 32 x (12304 + 21888) x 4096
bf16 = 9.0 GB while decoding, on top of the model's 13.7 GB. Every other weight is shared.
The formulas mirror layers/common.py and layers/mlstm.py; tests/test_fused_decode.py holds them to
the model's forward.

The hybrid path (CUDA, the default up to ``max_hybrid_batch`` rows): one GEMM per projection with
single launches between them. Up to 16 rows (``ops.decode.skinny_linear``, a split-K kernel that
streams the weights faster than cuBLAS's small-batch kernels) a block is five launches:

    input GEMM [x rsqrt(mean x^2)]  step kernel  out_proj [+ residual, x norm weight, sums of x^2]
    gate|up GEMM [x rsqrt(mean x^2), silu(gate) x up]  proj_down [+ residual, x next norm weight, sums]

each RMSNorm split between the GEMM that makes its input (the epilogue adds the residual and
writes x * weight with each tile's sum of x^2) and the GEMM that reads it (which scales its rows by
rsqrt(mean x^2 + eps)); the LM head's epilogue soft-caps the logits in float32. The step kernel
(ops.decode.mlstm_head_step) does the gate caps, the mLSTM step and head norm x sigmoid(o).
7B on the H200, chained steps in one CUDA graph, one process (run 60): batch 1 252.4 against 247.8
tokens/s for the eight launches of row kernels between the GEMMs, batch 16 3,057 against 3,005.
Norms with a bias or reduced in the model's dtype stay row kernels (seven launches); above 16 rows
the GEMMs are cuBLAS's with the row kernels and silu x up between (eight); above
``max_hybrid_batch``, the compiled pieces.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import ops
from ..layers.common import add_rms_norm, head_layer_norm, rms_norm, silu_mul, soft_cap
from ..ops import MLSTMState

__all__ = ["FusedStep"]


class _BlockWeights(NamedTuple):
    norm_w: torch.Tensor
    norm_b: torch.Tensor | None
    w_in: torch.Tensor                # (2 Dqk_all + 2 Dv_all + 2 H, E): q | k | v | o | i | f
    b_in: torch.Tensor                # zeros where the model's projection has no bias
    head_w: torch.Tensor
    head_b: torch.Tensor | None
    out_w: torch.Tensor
    out_b: torch.Tensor | None
    ffn_norm_w: torch.Tensor
    ffn_norm_b: torch.Tensor | None
    w_up: torch.Tensor                # (2 F, E): gate | up
    b_up: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None


class FusedStep:
    """The decode step of ``model`` (an XLSTMLarge) with fused projections and elementwise work.

    compile: run the pieces through torch.compile (default: on CUDA). hybrid: one GEMM per
    projection with the row and step kernels between them; None: on CUDA up to
    ``max_hybrid_batch`` rows (float32/bfloat16/float16 weights), True: at every batch (also on the
    CPU under TRITON_INTERPRET=1, for tests), False: the compiled pieces.
    inplace_state: the hybrid's step kernel writes the new C and n over the state it is given,
    which the caller gives up (the engine's decoders own theirs): no state copy at a CUDA graph's
    end. Off by default: states are values.
    The weights are read from the model when this is built: rebuild after changing them.
    """

    # the hybrid against the compiled pieces, 7B shape on the H200 (run 24, chained steps in one CUDA
    # graph): 2,697 vs 2,592 tokens/s at batch 16, 6,612 vs 6,859 at batch 64
    max_hybrid_batch = 32

    def __init__(self, model, *, compile: bool | None = None, hybrid: bool | None = None,
                 inplace_state: bool = False):
        from ..model import XLSTMLarge

        if not isinstance(model, XLSTMLarge):
            raise ValueError(f"the fused decode step needs an XLSTMLarge, got {type(model).__name__}")
        cfg = model.cfg
        self.model = model
        self.device = model.embedding.weight.device
        self.backend = model.backend_for(self.device)
        self.num_heads = cfg.num_heads
        self.eps, self.f32 = cfg.norm_eps, cfg.norm_reduction_force_float32
        self.gate_cap, self.cell_eps, self.logit_cap = cfg.gate_soft_cap, cfg.cell_eps, cfg.output_logit_soft_cap
        self.ffn_dim = model.backbone.blocks[0].ffn.proj_up.out_features
        with torch.no_grad():
            self.blocks = [self._fuse(b) for b in model.backbone.blocks]
        out_norm = model.backbone.out_norm
        self.out_norm = (out_norm.weight, out_norm.bias) if hasattr(out_norm, "weight") else None
        layer = model.backbone.blocks[0].mlstm_layer
        self.sizes = (layer.q.out_features, layer.k.out_features, layer.v.out_features,
                      layer.ogate_preact.out_features, cfg.num_heads, cfg.num_heads)
        use_compile = self.device.type == "cuda" if compile is None else compile
        self._in, self._out, self._head = ((_compiled("in"), _compiled("out"), _compiled("head")) if use_compile
                                           else (_mlstm_in, _mlstm_out_ffn, _head))
        self.hybrid = hybrid
        self.inplace_state = inplace_state
        self._hybrid_fits = (self.device.type == "cuda" and ops.triton_available()
                             and model.embedding.weight.dtype in (torch.float32, torch.bfloat16, torch.float16))
        self._lock = None
        # the RMSNorms can ride in skinny_linear's epilogues when they are weight-only norms reduced
        # in float32 (as the model's RMSNorm by default)
        norms = [(b.norm_w, b.norm_b) for b in self.blocks] + [(b.ffn_norm_w, b.ffn_norm_b) for b in self.blocks]
        self._norms_fold = self.f32 and all(w is not None and b is None for w, b in norms) and (
            self.out_norm is None or self.out_norm[1] is None)
        # the sums of x^2 that skinny_linear hands from a norm's producer to its consumer (16 rows
        # per weight tile; E tiles bounds any tiling)
        self._sums = torch.empty(16 * cfg.embedding_dim, device=self.device, dtype=torch.float32)
        self._skinny_tiles = None                                    # skinny_linear's counters, on first use
        with torch.no_grad():
            self._in_bias = [w.b_in if w.b_in.any() else None for w in self.blocks]   # no all-zero bias add

    @staticmethod
    def _fuse(block) -> _BlockWeights:
        layer, ffn = block.mlstm_layer, block.ffn
        ins = (layer.q, layer.k, layer.v, layer.ogate_preact, layer.igate_preact, layer.fgate_preact)
        w_in = torch.cat([lin.weight for lin in ins])
        # +0 is exact, so one bias vector serves projections with and without a bias
        b_in = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                          for lin in ins])
        w_up = torch.cat([ffn.proj_up_gate.weight, ffn.proj_up.weight])
        b_up = (torch.cat([ffn.proj_up_gate.bias, ffn.proj_up.bias]) if ffn.proj_up.bias is not None else None)
        return _BlockWeights(block.norm_mlstm.weight, block.norm_mlstm.bias, w_in, b_in,
                             layer.multihead_norm.weight, layer.multihead_norm.bias,
                             layer.out_proj.weight, layer.out_proj.bias, block.norm_ffn.weight, block.norm_ffn.bias,
                             w_up, b_up, ffn.proj_down.weight, ffn.proj_down.bias)

    def uses_hybrid(self, batch: int) -> bool:
        """Whether a step of this batch size runs the hybrid path (GEMMs with the row and step kernels between)."""
        if self.hybrid is not None:
            return self.hybrid
        return self._hybrid_fits and batch <= self.max_hybrid_batch

    @property
    def extra_bytes(self) -> int:
        """Bytes of the fused weight copies this step holds."""
        return sum(t.numel() * t.element_size() for b in self.blocks for t in (b.w_in, b.b_in, b.w_up, b.b_up)
                   if t is not None)

    def __call__(self, input_ids: torch.Tensor, state: list[MLSTMState]) -> tuple[torch.Tensor, list[MLSTMState]]:
        self._check(input_ids, state)
        if self.uses_hybrid(input_ids.shape[0]):
            return self._hybrid_step(input_ids, state)
        x = self.model.embedding(input_ids[:, 0])                     # (B, E)
        d = None
        new_state = []
        for w, s in zip(self.blocks, state):
            x, q, k, v, o, i, f = self._in(x, d, w.norm_w, w.norm_b, w.w_in, w.b_in, self.sizes,
                                           self.num_heads, self.eps, self.f32, self.gate_cap)
            h, s = ops.mlstm_step(q, k, v, i, f, s, backend=self.backend, eps=self.cell_eps)
            x, d = self._out(x, h, o, w.head_w, w.head_b, w.out_w, w.out_b, w.ffn_norm_w, w.ffn_norm_b,
                             w.w_up, w.b_up, w.down_w, w.down_b, self.ffn_dim, self.eps, self.f32)
            new_state.append(s)
        nw, nb = self.out_norm if self.out_norm is not None else (None, None)
        logits = self._head(x, d, self.out_norm is not None, nw, nb, self.model.lm_head.weight,
                            self.eps, self.f32, self.logit_cap)
        return logits.unsqueeze(1), new_state

    def _hybrid_step(self, input_ids, state):
        """Up to ops.decode.SKINNY_ROWS rows with weight-only float32 norms: _skinny_step. Otherwise
        one GEMM per projection (skinny_linear up to SKINNY_ROWS rows, cuBLAS above); between them
        one launch each for the residual add + RMSNorm and the gate caps + mLSTM step + head norm x
        sigmoid(o); silu x up is the gate|up GEMM's epilogue (skinny_linear) or one more launch
        (cuBLAS). The FFN's residual add is the next block's (or the head's)."""
        from ..ops import decode

        B = input_ids.shape[0]
        lock = self._lock_for(B)
        if self._skinny_path(B):
            return self._skinny_step(input_ids, state, lock)
        x = self.model.embedding(input_ids[:, 0])                     # (B, E)
        d = None
        new_state = []
        lin = self._small_linear(B, lock)
        for w, b_in, s in zip(self.blocks, self._in_bias, state):
            x, xn = add_rms_norm(x, d, w.norm_w, w.norm_b, self.eps, self.f32)
            hn, s = self._cell(lin(xn, w.w_in, b_in), w, s, lock)
            x, xn = add_rms_norm(x, lin(hn, w.out_w, w.out_b), w.ffn_norm_w, w.ffn_norm_b, self.eps, self.f32)
            if B <= decode.SKINNY_ROWS:                             # silu(gate) * up in the GEMM's epilogue
                act = decode.skinny_linear(xn, w.w_up, w.b_up, glu=True, lock=lock)
            else:
                act = silu_mul(*F.linear(xn, w.w_up, w.b_up).split(self.ffn_dim, dim=-1))
            d = lin(act, w.down_w, w.down_b)
            new_state.append(s)
        if self.out_norm is not None:
            _, x = add_rms_norm(x, d, *self.out_norm, self.eps, self.f32)
        else:
            x = x + d
        return _capped_logits(lin(x, self.model.lm_head.weight, None), self.logit_cap).unsqueeze(1), new_state

    def _check(self, input_ids, state):
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"the fused step takes one token per row, (B, 1), got {tuple(input_ids.shape)}")
        if state is None or len(state) != len(self.blocks):
            raise ValueError(f"the fused step needs a state of {len(self.blocks)} blocks")

    def greedy_step(self, input_ids: torch.Tensor, state: list[MLSTMState], out: torch.Tensor) -> list[MLSTMState]:
        """One decode step that writes each row's argmax token into ``out`` (B,) int64 (a view is
        fine: the engine passes a column of its token buffer) and returns the new state. On the
        five-launch path the argmax is the LM head GEMM's epilogue (no launch of its own, no copy);
        elsewhere logits.argmax as the greedy choice does it."""
        B = input_ids.shape[0]
        if self._skinny_path(B):
            self._check(input_ids, state)
            _, state = self._skinny_step(input_ids, state, self._lock_for(B), argmax_out=out)
            return state
        logits, state = self(input_ids, state)
        out.copy_(logits[:, -1].float().argmax(-1))
        return state

    def _skinny_path(self, batch: int) -> bool:
        from ..ops import decode

        return self.uses_hybrid(batch) and batch <= decode.SKINNY_ROWS and self._norms_fold

    def _skinny_step(self, input_ids, state, lock, argmax_out=None):
        """Up to SKINNY_ROWS rows, five launches a block: each RMSNorm rides in the GEMMs around it
        (the one before adds the residual and writes x * norm weight with the sums of x^2, the one
        after scales its rows by rsqrt(mean x^2 + eps)), silu x up in the gate|up GEMM's epilogue,
        the logits' float32 soft cap in the LM head's."""
        from ..ops import decode

        sums = self._sums
        x, xn = add_rms_norm(self.model.embedding(input_ids[:, 0]), None, self.blocks[0].norm_w, None,
                             self.eps, self.f32)
        sq, new_state = None, []
        norms_after = [b.norm_w for b in self.blocks[1:]] + [self.out_norm[0] if self.out_norm else None]
        for w, b_in, s, next_norm in zip(self.blocks, self._in_bias, state, norms_after):
            y = decode.skinny_linear(xn, w.w_in, b_in, lock=lock, rms=sq, eps=self.eps)
            hn, s = self._cell(y, w, s, lock)
            x, xn, sq = decode.skinny_linear(hn, w.out_w, w.out_b, lock=lock, residual=x,
                                             norm_weight=w.ffn_norm_w, sumsq=sums)
            act = decode.skinny_linear(xn, w.w_up, w.b_up, glu=True, lock=lock, rms=sq, eps=self.eps)
            if next_norm is None:
                x, xn, sq = decode.skinny_linear(act, w.down_w, w.down_b, lock=lock, residual=x), None, None
            else:
                x, xn, sq = decode.skinny_linear(act, w.down_w, w.down_b, lock=lock, residual=x,
                                                 norm_weight=next_norm, sumsq=sums)
            new_state.append(s)
        logits = decode.skinny_linear(x if xn is None else xn, self.model.lm_head.weight, None, lock=lock, rms=sq,
                                      eps=self.eps, logits=True, logit_cap=self.logit_cap, argmax_out=argmax_out)
        return logits.unsqueeze(1), new_state

    def _cell(self, y, w, s, lock):
        """The gate caps + mLSTM step + head norm x sigmoid(o) (one launch) on the input GEMM's y."""
        from ..ops import decode

        # early_state: the launch before the step kernel is the input GEMM, which never writes the
        # state, so with PDL the state is read while it drains (B1 215.6 -> 217.5, B16 2,868 ->
        # 2,875 tokens/s, run 41, one process)
        return decode.mlstm_head_step(y, self.sizes, s, w.head_w, w.head_b, num_heads=self.num_heads,
                                      eps=self.cell_eps, norm_eps=self.eps, gate_cap=self.gate_cap, lock=lock,
                                      early_state=True, inplace=self.inplace_state)

    def _small_linear(self, batch: int, lock: torch.Tensor):
        """The hybrid's GEMM for this batch: ops.decode.skinny_linear up to its SKINNY_ROWS, else cuBLAS."""
        from ..ops import decode

        if batch <= decode.SKINNY_ROWS:
            return lambda x, w, b: decode.skinny_linear(x, w, b, lock=lock)
        return F.linear

    def _lock_for(self, batch: int) -> torch.Tensor:
        """The step kernel's per-head and skinny_linear's per-tile counters: int32 zeros, reset by
        the kernels themselves, one buffer for every launch (they run one after another)."""
        from ..ops import decode

        if self._skinny_tiles is None:                               # the same for every batch: once
            b = self.blocks[0]
            weights = [self.model.lm_head.weight, b.w_in, b.out_w, b.w_up, b.down_w]
            self._skinny_tiles = max(decode.skinny_lock_size(*w.shape, self.device, argmax=w is weights[0])
                                     for w in weights)
        need = max(batch * self.num_heads, self._skinny_tiles)
        if self._lock is None or self._lock.numel() < need:
            self._lock = torch.zeros(need, dtype=torch.int32, device=self.device)
        return self._lock


# --- the pieces: plain tensor functions (torch.compile sees the same arguments for every block) ---

def _mlstm_in(x, d, norm_w, norm_b, w_in, b_in, sizes: tuple, heads: int, eps: float, f32: bool, cap: float):
    """x (+ the previous FFN output d) -> x, and the cell inputs q, k (B, H, Dqk), v, o (B, H, Dv)
    and the soft-capped gates i, f (B, H), all contiguous (the step kernel wants them so)."""
    if d is not None:
        x = x + d
    y = F.linear(rms_norm(x, norm_w, norm_b, eps, f32), w_in, b_in)
    q, k, v, o, i, f = y.split(sizes, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, -1)).contiguous() for t in (q, k, v))
    return x, q, k, v, o, soft_cap(i, cap).contiguous(), soft_cap(f, cap).contiguous()


def _mlstm_out_ffn(x, h, o, head_w, head_b, out_w, out_b, ffn_norm_w, ffn_norm_b, w_up, b_up, down_w, down_b,
                   ffn_dim: int, eps: float, f32: bool):
    """The layer's output (head norm x output gate, out_proj), its residual add, then the FFN;
    returns x and the FFN output (its residual add is left to the next piece)."""
    x = x + F.linear(torch.sigmoid(o) * head_layer_norm(h, head_w, head_b, eps, f32), out_w, out_b)
    gate, up = F.linear(rms_norm(x, ffn_norm_w, ffn_norm_b, eps, f32), w_up, b_up).split(ffn_dim, dim=-1)
    return x, F.linear(F.silu(gate) * up, down_w, down_b)


def _head(x, d, use_norm: bool, norm_w, norm_b, lm_w, eps: float, f32: bool, cap):
    x = x + d
    if use_norm:
        x = rms_norm(x, norm_w, norm_b, eps, f32)
    return _capped_logits(F.linear(x, lm_w), cap)


def _capped_logits(logits, cap):
    """The LM head's end as the model's: half-precision logits to float32 (the cap needs the
    range), then the soft cap."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return soft_cap(logits, cap)


@functools.cache
def _compiled(name: str):
    """torch.compile of a piece, made on first use (no import-time work). Default dynamic shapes:
    static at first, a batch dimension goes symbolic once a second batch size is seen, so batch
    sizes do not pile up recompilations."""
    return torch.compile({"in": _mlstm_in, "out": _mlstm_out_ffn, "head": _head}[name])
