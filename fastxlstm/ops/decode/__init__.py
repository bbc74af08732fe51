"""Small-batch decode ops for XLSTMLarge: the decode step kernel (mLSTM step + head norm x
sigmoid(o)), a split-K GEMM for up to 16 rows, and GEMV kernels that run a block in five launches
at batch 1 (Triton kernels in triton/, which says what each does and what was measured). No
autograd: decoding only."""

from .triton import (CONFIG, SKINNY_ROWS, linear, lock_size, mlstm_head_step, norm_linear, norm_swiglu,
                     skinny_linear, skinny_lock_size)

__all__ = ["norm_linear", "linear", "norm_swiglu", "mlstm_head_step", "lock_size", "skinny_linear", "skinny_lock_size",
           "SKINNY_ROWS", "CONFIG"]
