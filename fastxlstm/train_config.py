"""Training configuration: one flat, frozen, validated dataclass (the model's lives in config.py).

Every field has a docstring; the ``fastxlstm train`` flags and their help are generated from them.
Sizes are global: ``batch_size`` sequences per optimizer step across all ranks and micro-steps, so
a run means the same thing on one CPU and on eight GPUs.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Literal

from .config import known_fields


class Parallel(str, enum.Enum):
    """How a torchrun job spreads the model over its ranks."""

    NONE = "none"
    DDP = "ddp"
    FSDP = "fsdp"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: data, optimisation, schedule, checkpoints, logging."""

    out: str = "runs/tiny"
    """Run directory: metrics.jsonl, loss.png, checkpoints/ and the final model (loadable by fastxlstm.load)."""
    data: str | None = None
    """Training data: None or 'stdlib' for this Python's standard-library sources (the default corpus, found
    at run time), 'tales' for the small corpus shipped in the package, a text file or folder, a token file
    (.npy, or raw .bin with --token-dtype), or a folder with train.bin and val.bin."""
    tokenizer: str | None = None
    """A Hugging Face tokenizers tokenizer.json for text data (needs the tokenizers package); bytes when unset."""
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    """Element type of raw .bin token files."""
    val_fraction: float = 0.05
    """Share of the data (its tail) held out for validation when the data has no separate val split."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 16
    """Sequences per optimizer step, over all ranks and micro-steps (the global batch)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step; batch_size must divide by world size * grad_accum."""
    max_steps: int = 2000
    """Optimizer steps in the whole run (a resumed run continues up to this)."""
    stop_at_step: int | None = None
    """Save a checkpoint and stop after this step although the schedule runs to max_steps (to split a run
    into pieces, e.g. under a job time limit; continue with --resume)."""
    lr: float = 4e-3
    """Peak learning rate (after warm-up)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio at max_steps."""
    warmup_steps: int = 60
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay on weight matrices; the embedding, norms and biases get none."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 0
    """Seed of the weights, the data order and sampling."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast (fp32 master weights) on CUDA, fp32 on the CPU."""
    device: str = "auto"
    """auto (CUDA when present, one GPU per rank by LOCAL_RANK), cpu or cuda."""
    parallel: Parallel = Parallel.NONE
    """none, ddp or fsdp (FSDP2, fully_shard per block); ddp and fsdp run under torchrun."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, about a third more compute)."""
    compile: bool = False
    """torch.compile the blocks: the whole stack as one graph in a single process, each block alone
    under ddp and fsdp."""
    stateful: bool = False
    """Carry the recurrent state (detached) from each step to the next: every batch row reads its own
    contiguous stream of the data instead of random windows."""
    document_end_id: int | None = None
    """Token id that ends a document (e.g. the tokenizer's EOS; 10 is a newline for bytes). When set,
    batches are packed documents: the recurrent state restarts after every occurrence, exactly as if
    each document ran alone (xlstm_large, not with stateful)."""
    eval_every: int = 500
    """Validation loss and bits per byte every this many steps (and at the end); 0: only at the end."""
    eval_batches: int = 8
    """Validation batches of batch_size sequences (fixed windows, the same at every evaluation)."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many steps."""
    ckpt_every: int = 500
    """Save a resumable checkpoint every this many steps (and at the end and on SIGINT/SIGTERM); 0: only those."""
    keep_last: int = 2
    """Resumable checkpoints kept in OUT/checkpoints; older ones are deleted."""
    resume: str | None = field(default=None, metadata={"const": "latest"})
    """Continue from a checkpoint directory, or 'latest' (what a bare --resume means) for the newest in
    OUT/checkpoints. A corrupt or truncated checkpoint is an error, never skipped."""
    sample_prompt: str = "def "
    """Prompt of the sample printed after each evaluation and at the end."""
    sample_tokens: int = 300
    """Tokens to sample at each evaluation and at the end (0: no samples)."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    tensorboard: bool = False
    """Also write each logged record as TensorBoard scalars in OUT/tensorboard (needs the tensorboard
    package: pip install fastxlstm[tensorboard]); metrics.jsonl is written either way."""

    def __post_init__(self):
        object.__setattr__(self, "parallel", _enum(Parallel, self.parallel, "parallel"))
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "log_every", "keep_last"):
            _check_int(name, getattr(self, name), lo=1)
        for name in ("warmup_steps", "eval_every", "ckpt_every", "seed", "sample_tokens"):
            _check_int(name, getattr(self, name), lo=0)
        for name, lo, lo_open, hi, hi_open in (("lr", 0, True, math.inf, False),
                                               ("min_lr_ratio", 0, False, 1, False),
                                               ("val_fraction", 0, True, 1, True),
                                               ("weight_decay", 0, False, math.inf, False),
                                               ("beta1", 0, False, 1, True), ("beta2", 0, False, 1, True),
                                               ("grad_clip", 0, False, math.inf, False),
                                               ("temperature", 0, False, math.inf, False)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or \
                    value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
                raise ValueError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}"
                                 f"{')' if hi_open else ']'}, got {value!r}")
        if self.document_end_id is not None:
            _check_int("document_end_id", self.document_end_id, lo=0)
            if self.stateful:
                raise ValueError("document_end_id (packed documents) and stateful (carried state) exclude each other")
        if self.stop_at_step is not None:
            _check_int("stop_at_step", self.stop_at_step, lo=1)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        for name, choices in (("precision", ("auto", "fp32", "bf16")), ("token_dtype", ("uint16", "uint32"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("out", "sample_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not self.out:
            raise ValueError("out must name a run directory, got ''")
        for name in ("data", "tokenizer", "resume"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be None or a non-empty string, got {value!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["parallel"] = self.parallel.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of to_dict; unknown keys are an error, never silently dropped."""
        return cls(**known_fields(cls, d))


def _check_int(name: str, value, *, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _enum(kind, value, name):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in kind]}, got {value!r}") from None
