"""A drop-in sequence module for work beyond language models (time series, audio, control).

``XLSTM`` maps features (B, T, input_size) to (output, state) the way ``torch.nn.LSTM`` does:
an initial state in, the final state out, batch_first, an optional second direction. Inside is
the original xLSTM block stack (mLSTM blocks, with sLSTM blocks at ``slstm_at``), with no
context-length limit and no build step.

    rnn = XLSTM(input_size=12, hidden_size=64, num_blocks=4, slstm_at=(1,))
    y, state = rnn(x)                      # x (B, T, 12) -> y (B, T, 64)
    y2, state = rnn(x_next, state)         # continue the same sequences

State: ``state[d][b]`` is the LayerState(conv, cell) of block b in direction d (d = 0 forward,
1 backward). The backward direction reads the sequence reversed, so its state describes the
start of the chunk (as with torch.nn.LSTM, carrying it across chunks is rarely meaningful).
"""

from __future__ import annotations

import torch
from torch import nn

from .stack import StackConfig, XLSTMStack


class XLSTM(nn.Module):
    """(B, T, input_size) -> output (B, T, hidden_size * num_directions), state.

    Args:
        input_size: features per step; a linear map to hidden_size comes first when they differ
            (shared by both directions).
        hidden_size: width of the block stack (StackConfig.embedding_dim).
        num_blocks: residual blocks per direction.
        slstm_at: indices of sLSTM blocks, the rest are mLSTM (e.g. (1,) for xLSTM[1:1]-like stacks).
        bidirectional: add a second stack over the reversed sequence; outputs are concatenated.
        batch_first: (B, T, F) when True (the default here), (T, B, F) otherwise.
        **stack_options: any other StackConfig field (mlstm_num_heads, slstm_num_heads, backend, ...).
    """

    def __init__(self, input_size: int, hidden_size: int, num_blocks: int = 2, *, slstm_at=(),
                 bidirectional: bool = False, batch_first: bool = True, **stack_options):
        super().__init__()
        if not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        if "vocab_size" in stack_options or "embedding_dim" in stack_options:
            raise ValueError("pass hidden_size instead of embedding_dim; vocab_size has no meaning here")
        self.cfg = StackConfig(embedding_dim=hidden_size, num_blocks=num_blocks, slstm_at=tuple(slstm_at),
                               **stack_options)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.bidirectional, self.batch_first = bidirectional, batch_first
        self.proj_in = nn.Linear(input_size, hidden_size) if input_size != hidden_size else nn.Identity()
        self.directions = nn.ModuleList(XLSTMStack(self.cfg) for _ in range(2 if bidirectional else 1))

    def forward(self, x: torch.Tensor, state: list | None = None) -> tuple[torch.Tensor, list]:
        """x: (B, T, input_size) (or (T, B, ...) when not batch_first); state: as returned, or None."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must be a 3-d tensor with {self.input_size} features last, "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        if state is not None and (not isinstance(state, (list, tuple)) or len(state) != len(self.directions)):
            raise ValueError(f"state must be a list with one entry per direction ({len(self.directions)})")
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.proj_in(x)
        outs, states = [], []
        for d, stack in enumerate(self.directions):
            y, s = stack(h if d == 0 else h.flip(1), state[d] if state is not None else None)
            outs.append(y if d == 0 else y.flip(1))
            states.append(s)
        out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return (out if self.batch_first else out.transpose(0, 1)), states
