"""Small-batch decode ops for XLSTMLarge: the decode step kernel (gate caps + mLSTM step + head
norm x sigmoid(o)) and a split-K GEMM for up to 16 rows (Triton kernels in triton/, which says
what each does and what was measured). No autograd: decoding only."""

from .triton import CONFIG, SKINNY_ROWS, mlstm_head_step, skinny_linear, skinny_lock_size

__all__ = ["mlstm_head_step", "skinny_linear", "skinny_lock_size", "SKINNY_ROWS", "CONFIG"]
