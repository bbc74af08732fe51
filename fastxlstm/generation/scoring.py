"""Log-likelihood and perplexity of a text of any length in constant memory: the text is fed in
fixed-length pieces and the recurrent state is carried from one piece to the next."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..tokenizer import check_tokenizer, load_tokenizer
from .engine import check_model, config_id, model_device, prefill_piece

__all__ = ["score", "ScoreResult"]


@dataclass
class ScoreResult:
    """Log-likelihood of a text under the model."""

    log_likelihood: float
    """Sum of ln p(token | everything before it) over the predicted tokens."""
    tokens: int
    """Number of predicted tokens (all but the first)."""
    state: list
    """The state after the last token (continue generating or scoring from here): one MLSTMState
    (XLSTMLarge) or LayerState (XLSTMStackLM) per block."""

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per token, in nats."""
        return -self.log_likelihood / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)


@torch.inference_mode()
def score(model, text, *, tokenizer=None, add_bos: bool | None = None, piece_tokens: int | None = None,
          progress=None) -> ScoreResult:
    """Log-likelihood and perplexity of one text of any length, in constant memory.

    Args:
        text: a token-id list, a string, or an iterable of pieces (each a string or a token-id
            list) read one at a time, so the text need never be in memory whole.
        tokenizer: for strings (default: bytes for a 256-id model).
        add_bos: prepend the config's BOS id (default: True for text when the config has one).
        piece_tokens: tokens per forward call (default: the prefill piece); the state is carried
            between calls, so memory does not depend on the length. The pieces are cut at fixed
            offsets whatever the input's own split, so the result does not depend on how the input
            was split into pieces.
        progress: called with the number of tokens consumed so far after each forward call.
    """
    check_model(model)
    cfg = model.cfg
    bos_id = config_id(cfg, "bos_token_id")
    device = model_device(model)
    if isinstance(text, (str, bytes)) or (isinstance(text, (list, tuple)) and text and isinstance(text[0], int)):
        pieces: Iterable = [text]
    elif isinstance(text, torch.Tensor):
        pieces = [text.reshape(-1).tolist()]
    else:
        pieces = text
    P = prefill_piece(model) if piece_tokens is None else piece_tokens
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"piece_tokens must be an int >= 1, got {piece_tokens!r}")
    state, prev, ll, n, fed = None, None, 0.0, 0, 0
    buf: list[int] = []
    first = True

    def feed(ids: list[int]):
        nonlocal state, prev, ll, n, fed
        x = torch.tensor(ids, dtype=torch.long, device=device)
        if prev is not None:
            ll += torch.log_softmax(prev.double(), -1)[x[0]].item()
            n += 1
        logits, state = model(x[None], state)
        if len(ids) > 1:
            lp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, x[1:, None])
            ll += lp.sum().item()
            n += len(ids) - 1
        prev = logits[0, -1]
        fed += len(ids)
        if progress is not None:
            progress(fed)

    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            if tokenizer is None:
                tokenizer = load_tokenizer(None, cfg.vocab_size)
            check_tokenizer(tokenizer, cfg.vocab_size)
            ids = tokenizer.encode(piece)
            is_text = True
        elif isinstance(piece, (list, tuple)):
            ids, is_text = list(piece), False
        else:
            raise ValueError(f"piece {i} must be a string or a list of token ids, got {type(piece).__name__}")
        if first:
            bos = add_bos if add_bos is not None else (is_text and bos_id is not None)
            if bos:
                if bos_id is None:
                    raise ValueError("add_bos=True, but the model config has no bos_token_id")
                ids = [bos_id] + ids
            first = False
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"piece {i} has token id {bad[0]!r} outside [0, {cfg.vocab_size})")
        buf.extend(ids)
        while len(buf) >= P:
            feed(buf[:P])
            del buf[:P]
    if buf:
        feed(buf)
    if n == 0:
        raise ValueError("nothing to score: the text must have at least 2 tokens (BOS included)")
    return ScoreResult(ll, n, state)
