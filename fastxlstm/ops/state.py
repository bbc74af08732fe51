"""Recurrent states as values: NamedTuples of tensors, never updated in place."""

from __future__ import annotations

from typing import NamedTuple

import torch


class MLSTMState(NamedTuple):
    """mLSTM state of one layer, stabilised: the true memory is ``c * exp(m)``.

    c: (B, H, Dqk, Dv), n: (B, H, Dqk), m: (B, H); float32 (float64 for float64 inputs).
    """

    c: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, heads: int, dqk: int, dv: int, *, device=None,
              dtype: torch.dtype = torch.float32) -> "MLSTMState":
        """The initial state: C = 0, n = 0 and m = 0 (not -inf), as in the published xLSTM-7B."""
        return cls(
            torch.zeros(batch, heads, dqk, dv, device=device, dtype=dtype),
            torch.zeros(batch, heads, dqk, device=device, dtype=dtype),
            torch.zeros(batch, heads, device=device, dtype=dtype),
        )


class SLSTMState(NamedTuple):
    """sLSTM state of one layer. c, n, m, h: (B, H, D) each, float32."""

    c: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor
    h: torch.Tensor


def state_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """States are float32 whatever the input dtype, float64 when any input is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
