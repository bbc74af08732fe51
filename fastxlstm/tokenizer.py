"""Tokenizers: a byte-level one built in (256 ids, UTF-8 bytes), and a Hugging Face ``tokenizers``
``tokenizer.json`` when a model directory holds one (the published xLSTM-7B ships GPT-NeoX files).

Both expose the same small interface: ``encode(text) -> list[int]`` (no special tokens added; BOS
comes from the model config, see ``encode_prompt``), ``decode(ids) -> str`` and ``vocab_size``.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "check_tokenizer", "IncrementalDecoder"]


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token id = UTF-8 byte value. Decoding replaces invalid byte sequences with U+FFFD."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"byte tokenizer ids must lie in [0, 256), got {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class HFTokenizer:
    """A ``tokenizers`` tokenizer.json. Special tokens are neither added on encode nor printed on decode."""

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise RuntimeError(f"{path} needs the 'tokenizers' package: pip install tokenizers "
                               "(or pip install 'fastxlstm[hf]')") from None
        self.path = os.fspath(path)
        self._tok = _Tok.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(model_dir: str | os.PathLike | None, vocab_size: int) -> Tokenizer:
    """The tokenizer for a model: ``model_dir/tokenizer.json`` if present, else the byte tokenizer
    for a 256-id model; anything else is an error (a byte tokenizer would silently misread text)."""
    if model_dir is not None:
        path = os.path.join(os.fspath(model_dir), "tokenizer.json")
        if os.path.isfile(path):
            tok = HFTokenizer(path)
            check_tokenizer(tok, vocab_size)
            return tok
    if vocab_size == 256:
        return ByteTokenizer()
    where = f"{model_dir} has no tokenizer.json" if model_dir is not None else "no model directory was given"
    raise ValueError(f"{where}, and the model's vocab_size is {vocab_size}, not the byte-level 256: "
                     "pass a tokenizer (fastxlstm.tokenizer.HFTokenizer('tokenizer.json')) or token ids")


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """Raise when the tokenizer can produce ids the model has no embedding for."""
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must have vocab_size, encode() and decode(), got {type(tokenizer).__name__}")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size} ids) does not fit the model "
                         f"(vocab_size {vocab_size}): wrong tokenizer for this model?")


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces as soon as they are complete.

    Decodes a short window of recent ids and emits only the new suffix, and holds back output that
    ends in U+FFFD (an unfinished multi-byte character), so joining the pieces gives the decoded
    text of all ids. Cost per token is O(window), not O(tokens so far).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # the recent ids only (the decode window)
        self._prefix = 0        # start of the decode window
        self._read = 0          # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        complete = not new_text.endswith("\ufffd")
        # an invalid byte run never completes: give up holding back after a few ids (bounded cost)
        if len(new_text) > len(prefix_text) and (complete or len(self.ids) - self._read > 8):
            self._prefix, self._read = self._read, len(self.ids)
            del self.ids[:self._prefix]                # only the window is kept: memory stays constant
            self._read -= self._prefix
            self._prefix = 0
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character is emitted as U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]
