"""Choosing the next token: greedy, or sampling with temperature, top-k, top-p, min-p and a
repetition penalty; reproducible per row from a seed.

Sampling is the Gumbel-max trick, argmax(log p + g), with the Gumbel noise g computed by hashing
(seed of the row, step index, token id): no random-number generator state exists at all. So

- a row's tokens depend only on its logits, its seed and the step, never on the other rows of the
  batch (a batch samples exactly what each prompt samples alone, with the same seed);
- the whole choice is fixed-shape tensor arithmetic with no host synchronisation, so it is
  captured inside the CUDA graph of the decode step;
- the noise is bit-identical on the CPU and on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "choose", "row_keys", "gumbel_noise"]

_M32 = 0xFFFFFFFF


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How the next token is chosen. The defaults are greedy decoding."""

    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax). Must be >= 0."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with probability mass >= top_p; in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's; in [0, 1)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty (> 0) on every token already in the prompt or the output: positive logits
    are divided by it, negative ones multiplied; 1 disables."""

    def __post_init__(self):
        def num(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            return v

        if num("temperature") < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables), got {self.top_k!r}")
        if not 0 < num("top_p") <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not 0 <= num("min_p") < 1:
            raise ValueError(f"min_p must lie in [0, 1), got {self.min_p}")
        if not num("repetition_penalty") > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1.0


def choose(logits: torch.Tensor, params: SamplingParams, *, keys: torch.Tensor | None = None,
           step: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) float -> next token ids (B,) int64. No host synchronisation.

    keys: (B,) int64 per-row hash keys from ``row_keys`` (needed unless greedy);
    step: () int64 tensor, the index of the token being chosen (0 = first new token);
    seen: (B, V) bool, tokens already present (needed when repetition_penalty != 1).
    """
    if logits.dtype != torch.float64:
        logits = logits.float()
    if params.uses_history:
        if seen is None:
            raise ValueError("repetition_penalty needs the seen-token mask")
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.greedy:
        return logits.argmax(-1)
    if keys is None or step is None:
        raise ValueError("sampling needs per-row keys and the step index")
    logits = logits / params.temperature
    neg_inf = torch.finfo(logits.dtype).min
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= params.top_p          # the top token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg_inf)
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), neg_inf)
    logp = torch.log_softmax(logits, dim=-1)
    return (logp + gumbel_noise(keys, step, logits.shape[-1])).argmax(-1)


def row_keys(seeds: list[int], device=None) -> torch.Tensor:
    """Per-row hash keys (B,) int64 in [0, 2^32) from integer seeds (any size >= 0)."""
    keys = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seeds must be ints >= 0, got {s!r}")
        k = 0x2545F491
        while True:                                       # fold every 32-bit word of the seed in
            k = _mix32_int(k ^ (s & _M32))
            s >>= 32
            if not s:
                break
        keys.append(k)
    return torch.tensor(keys, dtype=torch.int64, device=device)


def gumbel_noise(keys: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise (B, V) float32, a pure function of (key, step, token id)."""
    base = _mix32(keys ^ _mix32((step.to(torch.int64) * 0x9E3779B1 + 0x7F4A7C15) & _M32))   # (B,)
    token = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    bits = _mix32(_mix32(base[:, None] ^ token[None, :]) ^ 0x5BD1E995)                     # (B, V)
    # 24 random bits give a uniform in (0, 1) that float32 holds exactly, so log(u) and
    # log(-log(u)) are always finite
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (lowbias32 constants) on int64 tensors holding [0, 2^32).

    The products reach 2^64 and wrap; only their low 32 bits are kept, which wrapping preserves.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)
