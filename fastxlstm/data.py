"""Training data: where tokens come from, and which tokens each rank reads at each step.

Sources (``TrainConfig.data``): by default this Python's own standard-library sources (``stdlib``: every
``.py`` file under ``sysconfig``'s stdlib path, sorted, found at run time, so the first command works
offline), ``tales`` (a small corpus shipped in the package, ``fastxlstm/corpus/tales.txt``), text files or
folders, and token files (``.npy`` or raw ``.bin`` memmaps; a folder holding ``train.bin`` and
``val.bin``). Text is byte-level by default (vocabulary 256) or encoded by a ``tokenizers``
tokenizer.json. Without a separate validation file the last ``val_fraction`` of the tokens is the
validation split, so the split is fixed.

Sampling is a pure function of (seed, step): the global batch of step ``s`` is the same whichever
rank count or micro-step split reads it, and resuming needs nothing but the step.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokenizer import ByteTokenizer, HFTokenizer
from .train_config import TrainConfig

CORPUS = Path(__file__).with_name("corpus") / "tales.txt"


@dataclass(frozen=True)
class Dataset:
    """Train and validation tokens (1-D integer arrays, memmaps for token files) and how to read them."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    """An upper bound of the ids: the tokenizer's vocabulary, or max id + 1 of token files."""
    tokenizer: ByteTokenizer | HFTokenizer | None
    """None for token files given without --tokenizer: samples cannot be shown then."""
    bytes_per_token: float | None
    """UTF-8 bytes per token of the validation text (1 for bytes); None when unknown (token files)."""
    source: str

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train):,} train / {len(self.val):,} val tokens, "
                f"vocabulary {self.vocab_size} "
                f"({'token ids, no tokenizer: no samples' if self.tokenizer is None else repr(self.tokenizer)})")


def load_data(cfg: TrainConfig) -> Dataset:
    """The dataset TrainConfig names; bad paths and unusable files raise naming the file."""
    tok = _tokenizer(cfg.tokenizer) if cfg.tokenizer else ByteTokenizer()
    if cfg.data == "tales":
        if not CORPUS.is_file():
            raise FileNotFoundError(f"the shipped corpus {CORPUS} is missing from this installation")
        return _from_texts([CORPUS.read_text(encoding="utf-8")], tok, cfg, "shipped corpus (tales.txt)")
    if cfg.data is None or cfg.data == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
        if not files:
            raise FileNotFoundError(f"data 'stdlib': no .py files under {root}")
        return _from_texts(_read_texts(files), tok, cfg, f"Python standard library ({root}, {len(files)} files)")
    path = Path(cfg.data)
    if not path.exists():
        raise FileNotFoundError(f"data {cfg.data}: no such file or directory")
    if path.is_dir() and (path / "train.bin").is_file():
        train = _token_file(path / "train.bin", cfg.token_dtype)
        val = _token_file(path / "val.bin", cfg.token_dtype) if (path / "val.bin").is_file() else None
        return _from_tokens(train, val, cfg, tok if cfg.tokenizer else None, str(path))
    if path.is_file() and path.suffix in (".bin", ".npy"):
        return _from_tokens(_token_file(path, cfg.token_dtype), None, cfg, tok if cfg.tokenizer else None, str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                       p.relative_to(path).parts)) \
        if path.is_dir() else [path]
    texts = _read_texts(files)
    if not texts:
        raise ValueError(f"data {cfg.data}: no UTF-8 text files found")
    return _from_texts(texts, tok, cfg, str(path))


class Batches:
    """Which token windows each rank reads at each step; a pure function of (seed, step).

    The global batch of step ``s`` has ``batch_size`` rows. Rank ``r`` reads, in micro-step ``a``, the
    rows ``[(a * world + r) * micro, ... + micro)``, so any split of the same global batch over ranks
    and micro-steps reads the same windows. Random mode draws window starts uniformly; stateful mode
    gives each row a contiguous stream (row b starts at b/batch_size of the data and moves on by
    seq_len per step), so a recurrent state can be carried from step to step.
    """

    def __init__(self, tokens: np.ndarray, cfg: TrainConfig, *, rank: int = 0, world: int = 1):
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of world size ({world}) "
                             f"* grad_accum ({cfg.grad_accum})")
        if len(tokens) < cfg.seq_len + 1:
            raise ValueError(f"the training split has {len(tokens):,} tokens, fewer than seq_len + 1 = "
                             f"{cfg.seq_len + 1}: use more data or a shorter --seq-len")
        self.tokens, self.cfg, self.rank, self.world = tokens, cfg, rank, world
        self.micro = cfg.batch_size // (world * cfg.grad_accum)
        self.span = len(tokens) - cfg.seq_len       # number of valid window starts

    def starts(self, step: int) -> np.ndarray:
        """Window starts of the whole global batch of ``step`` (batch_size,)."""
        cfg = self.cfg
        if cfg.stateful:
            stream = np.arange(cfg.batch_size, dtype=np.int64) * (self.span // cfg.batch_size)
            return (stream + step * cfg.seq_len) % self.span
        return np.random.default_rng([cfg.seed, step]).integers(0, self.span, size=cfg.batch_size)

    def micro_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro, seq_len) int64, for this rank's rows of a micro-step."""
        lo = (micro_step * self.world + self.rank) * self.micro
        return windows(self.tokens, self.starts(step)[lo:lo + self.micro], self.cfg.seq_len)


def eval_windows(tokens: np.ndarray, cfg: TrainConfig, *, rank: int = 0, world: int = 1) -> np.ndarray:
    """Fixed validation window starts of this rank: eval_batches * batch_size windows spread evenly over
    the validation split, dealt round-robin to the ranks (the same windows at every evaluation)."""
    if len(tokens) < cfg.seq_len + 1:
        raise ValueError(f"the validation split has {len(tokens):,} tokens, fewer than seq_len + 1 = "
                         f"{cfg.seq_len + 1}: use more data, a larger --val-fraction or a shorter --seq-len")
    count = cfg.eval_batches * cfg.batch_size
    starts = np.linspace(0, len(tokens) - cfg.seq_len - 1, count).round().astype(np.int64)
    return starts[rank::world]


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs tokens[s : s + seq_len] and targets shifted by one, for each start; int64 tensors."""
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


# --- helpers ---------------------------------------------------------------------------------------

def _tokenizer(path: str) -> HFTokenizer:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer {path}: no such file")
    try:
        return HFTokenizer(path)
    except RuntimeError:
        raise
    except Exception as e:
        raise ValueError(f"tokenizer {path} is not a valid tokenizer.json: {e}") from None


def _read_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            if len(files) == 1:
                raise ValueError(f"data {f}: not UTF-8 text (token files must end in .bin or .npy)") from None
        except OSError as e:
            raise FileNotFoundError(f"data {f}: cannot be read ({e.strerror})") from None
    return texts


def _from_texts(texts: list[str], tok, cfg: TrainConfig, source: str) -> Dataset:
    raw = b"".join(t.encode("utf-8") + b"\n\n" for t in texts)
    if isinstance(tok, ByteTokenizer):
        tokens = np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)
    else:
        ids = [i for t in texts for i in tok.encode(t + "\n\n")]
        tokens = np.asarray(ids, dtype=np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32)
    n_bytes = len(raw)
    train, val = _split(tokens, cfg, source)
    return Dataset(train, val, tok.vocab_size, tok, n_bytes / max(len(tokens), 1), source)


def _from_tokens(train: np.ndarray, val: np.ndarray | None, cfg: TrainConfig, tok, source: str) -> Dataset:
    if val is None:
        train, val = _split(train, cfg, source)
    vocab = max(int(train.max()), int(val.max())) + 1
    if tok is not None and vocab > tok.vocab_size:
        raise ValueError(f"data {source} holds token id {vocab - 1}, outside the tokenizer's vocabulary "
                         f"of {tok.vocab_size}")
    return Dataset(train, val, tok.vocab_size if tok is not None else vocab, tok, None, source)


def _split(tokens: np.ndarray, cfg: TrainConfig, source: str) -> tuple[np.ndarray, np.ndarray]:
    n_val = math.ceil(len(tokens) * cfg.val_fraction)
    if len(tokens) - n_val < 2 or n_val < 2:
        raise ValueError(f"data {source} has only {len(tokens)} tokens: too few to split into train and validation")
    return tokens[:-n_val], tokens[-n_val:]


def _token_file(path: Path, dtype: str) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as e:
            raise ValueError(f"data {path}: not a readable .npy file ({e})") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"data {path}: a token file must be a 1-D integer array, got {arr.ndim}-D {arr.dtype}")
        return arr
    size = path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    if size == 0 or size % itemsize:
        raise ValueError(f"data {path}: {size} bytes is not a whole number of {dtype} tokens "
                         f"(truncated, or another --token-dtype?)")
    return np.memmap(path, dtype=dtype, mode="r")
