"""Log-likelihood and perplexity of a text of any length in constant memory: the text is fed in
fixed-length pieces and the recurrent state is carried from one piece to the next."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..tokenizer import ByteTokenizer, check_tokenizer, load_tokenizer
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


# candidates for a cut: right after a newline between two non-blank characters, or between a
# non-blank character and " word" (boundaries of GPT-2 style byte-level pre-tokenizers: the text
# on either side tokenizes as it does in the whole; each cut is checked with the tokenizer itself)
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)|(?<=\S)(?= \S)")
_MAX_CARRY = 1 << 20                                    # characters held back at most (one huge line)


class _TextJoiner:
    """Tokenizes a text given in string pieces as the whole text would be. A subword tokenizer can
    merge across the place where one piece ends and the next begins (a piece of lines ending in
    blank lines, a word cut in two), so each piece's tail after its last safe boundary is held back
    and prepended to the next. A boundary counts as safe only where the tokenizer gives the same
    tokens for the text around it whole and cut in two. The byte tokenizer needs none of this."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.exact = isinstance(tokenizer, ByteTokenizer)
        self.carry = ""
        self.warned = False

    def encode(self, piece: str) -> list[int]:
        if self.exact:
            return self.tokenizer.encode(piece)
        text = self.carry + piece
        cut = self._last_safe_cut(text)
        if cut is None and len(text) > _MAX_CARRY:
            cut = len(text)
            if not self.warned:
                warnings.warn("scoring text pieces: no place to join them exactly was found within "
                              f"{_MAX_CARRY:,} characters; tokens at the cut may differ from the whole "
                              "text's", stacklevel=3)
                self.warned = True
        if cut is None:
            self.carry = text
            return []
        self.carry = text[cut:]
        return self.tokenizer.encode(text[:cut])

    def flush(self) -> list[int]:
        text, self.carry = self.carry, ""
        return self.tokenizer.encode(text) if text else []

    def _last_safe_cut(self, text: str) -> int | None:
        cuts = [m.end() for m in _SAFE_CUT.finditer(text)]
        enc = self.tokenizer.encode
        for cut in reversed(cuts[-4:]):                 # the last few candidates, newest first
            left, right = text[max(0, cut - 200):cut], text[cut:cut + 200]
            if enc(left + right) == enc(left) + enc(right):
                return cut
        return None


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
            was split into pieces. String pieces are tokenized as their joined text would be: a
            subword tokenizer's tokens can span the place where two pieces meet, so each piece's
            tail after its last place where the tokenizer cuts the same (a line break or a space
            between words, checked) waits for the next piece.
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

    joiner = None
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            if tokenizer is None:
                tokenizer = load_tokenizer(None, cfg.vocab_size)
            if joiner is None:
                check_tokenizer(tokenizer, cfg.vocab_size)
                joiner = _TextJoiner(tokenizer)
            ids = joiner.encode(piece)
            is_text = True
        elif isinstance(piece, (list, tuple)):
            ids, is_text = list(piece), False
            if joiner is not None:                          # text held back comes first
                ids = joiner.flush() + ids
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
    if joiner is not None:
        buf.extend(joiner.flush())                          # the last piece's held-back tail
    for j in range(0, len(buf), P):                         # what is left: whole pieces, then the rest
        feed(buf[j:j + P])
    if n == 0:
        raise ValueError("nothing to score: the text must have at least 2 tokens (BOS included)")
    return ScoreResult(ll, n, state)
