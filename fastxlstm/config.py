"""Model configuration: one flat, frozen, validated dataclass; presets; derived sizes as properties.

Field names follow the published xLSTM-7B config, so a Hugging Face ``config.json`` maps 1:1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .ops import Backend


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of an xLSTM-Large language model (the xLSTM-7B family)."""

    vocab_size: int
    """Number of token ids; ids must lie in [0, vocab_size)."""
    embedding_dim: int = 1024
    """Model width E."""
    num_heads: int = 4
    """mLSTM heads per layer; qk_dim and v_dim must divide into them."""
    num_blocks: int = 24
    """Number of [mLSTM, FFN] residual blocks."""
    qk_dim_factor: float = 0.5
    """Query/key width per layer as a fraction of E (int(E * factor))."""
    v_dim_factor: float = 1.0
    """Value width per layer as a fraction of E (int(E * factor))."""
    ffn_proj_factor: float = 2.667
    """SwiGLU hidden width before rounding: E * factor (the literal factor matters, see ffn_dim)."""
    ffn_round_up_to_multiple_of: int = 64
    """The SwiGLU hidden width is rounded up to a multiple of this."""
    gate_soft_cap: float = 15.0
    """Input/forget gate pre-activations are soft-capped: cap * tanh(x / cap)."""
    output_logit_soft_cap: float = 30.0
    """Logits are soft-capped at this value."""
    norm_eps: float = 1e-6
    """Epsilon of every RMSNorm and of the per-head LayerNorm."""
    norm_reduction_force_float32: bool = True
    """Compute norm reductions in float32 whatever the activation dtype."""
    cell_eps: float = 1e-6
    """Epsilon added to the mLSTM denominator after the max."""
    use_bias: bool = False
    """Biases on every projection and norm (the gates always have biases)."""
    add_out_norm: bool = True
    """RMSNorm before the LM head."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head."""
    chunk_size: int = 64
    """Chunk length of the chunkwise mLSTM kernels (any sequence length is accepted)."""
    backend: Backend = Backend.AUTO
    """mLSTM kernels: auto (Triton on CUDA when available, else native), native, triton, reference."""
    igate_bias_init: float = -10.0
    """Initial input-gate bias (the xLSTM-7B recipe starts input gates nearly closed)."""
    bos_token_id: int | None = 0
    """Token prepended to prompts (the xLSTM-7B expects BOS); None when the tokenizer has none."""
    eos_token_id: int | None = 2
    """End-of-sequence token id, or None."""
    pad_token_id: int | None = 1
    """Padding token id, or None."""

    def __post_init__(self):
        object.__setattr__(self, "backend", _enum(Backend, self.backend, "backend"))
        for name in ("vocab_size", "embedding_dim", "num_heads", "num_blocks", "chunk_size",
                     "ffn_round_up_to_multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "norm_eps", "cell_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0 (0 disables the cap), got {value!r}")
        for name, dim in (("qk_dim", self.qk_dim), ("v_dim", self.v_dim)):
            if dim < self.num_heads or dim % self.num_heads:
                raise ValueError(f"{name} = int(embedding_dim * {name}_factor) = {dim} does not divide into "
                                 f"num_heads = {self.num_heads} heads")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be None or an id in [0, {self.vocab_size}), got {value!r}")

    @property
    def qk_dim(self) -> int:
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """ceil(E * ffn_proj_factor / multiple) * multiple: 2.667 gives 10944 at E=4096."""
        m = self.ffn_round_up_to_multiple_of
        return int(math.ceil(self.embedding_dim * self.ffn_proj_factor / m) * m)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["backend"] = self.backend.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error, never silently dropped."""
        return cls(**known_fields(cls, d))


def known_fields(cls, d: dict) -> dict:
    """``d`` checked against the fields of dataclass ``cls``: unknown keys raise, naming them."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return d


def _enum(kind, value, name):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in kind]}, got {value!r}") from None


PRESETS: dict[str, ModelConfig] = {
    # a few-million-parameter byte-level model that trains on a CPU in minutes
    "tiny": ModelConfig(vocab_size=256, embedding_dim=128, num_heads=4, num_blocks=2, chunk_size=32,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None),
    "125m": ModelConfig(vocab_size=50304, embedding_dim=768, num_heads=4, num_blocks=12),
    "350m": ModelConfig(vocab_size=50304, embedding_dim=1024, num_heads=4, num_blocks=24),
    "1.3b": ModelConfig(vocab_size=50304, embedding_dim=2048, num_heads=4, num_blocks=24),
    "7b": ModelConfig(vocab_size=50304, embedding_dim=4096, num_heads=8, num_blocks=32),
}
