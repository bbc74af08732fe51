"""The original xLSTM stack (NeurIPS 2024): mLSTM and sLSTM blocks mixed by position, e.g.
xLSTM[7:1] = seven mLSTM blocks to one sLSTM block, and a language model on top.

    block = x + layer(LayerNorm(x)) [+ FFN(LayerNorm(x)) for sLSTM blocks]
    LM    = embedding -> blocks -> LayerNorm -> LM head (optionally tied)

State is a value: ``logits, state = model(input_ids, state)`` with one LayerState(conv, cell)
per block, so a prefill followed by single-token steps equals one full forward.
Norms store their actual scale (the official package stores scale - 1; the converter adds 1).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .config import known_fields
from .layers.common import GatedFFN, LayerState, round_up, small_init_, wang_init_
from .layers.original_mlstm import OriginalMLSTMLayer
from .layers.slstm import SLSTMLayer
from .ops import Backend, resolve_backend
from .ops.slstm import FORGET_GATES

log = logging.getLogger("fastxlstm")


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    """Architecture of an original xLSTM block stack (and of its language model)."""

    embedding_dim: int = 128
    """Residual stream width E."""
    num_blocks: int = 8
    """Number of residual blocks."""
    slstm_at: tuple[int, ...] = ()
    """Indices of the sLSTM blocks; all others are mLSTM. xLSTM[7:1] with 8 blocks: (7,) or (3,)."""
    vocab_size: int | None = None
    """Token ids lie in [0, vocab_size); needed by XLSTMStackLM, unused by the sequence module."""
    tie_word_embeddings: bool = False
    """Share the LM head with the token embedding."""
    add_post_blocks_norm: bool = True
    """LayerNorm after the last block."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm and per-head norm (the official stack uses 1e-5)."""
    mlstm_num_heads: int = 4
    """Heads of each mLSTM cell; they split the inner width."""
    mlstm_proj_factor: float = 2.0
    """mLSTM inner width = E * factor, rounded up to a multiple of 64."""
    qkv_block_size: int = 4
    """Block size of the block-diagonal q, k, v projections."""
    mlstm_conv_kernel_size: int = 4
    """Causal conv width in the mLSTM layer (>= 1)."""
    mlstm_bias: bool = False
    """Biases on the mLSTM layer's projections (the gates always have biases)."""
    cell_eps: float = 1e-6
    """Epsilon added to the mLSTM denominator after the max."""
    chunk_size: int = 64
    """Chunk length of the chunkwise mLSTM op (any sequence length is accepted)."""
    slstm_num_heads: int = 4
    """Heads of each sLSTM cell (block-diagonal recurrent weights); must divide E."""
    slstm_conv_kernel_size: int = 4
    """Causal conv width feeding the sLSTM i and f gates; 0 disables the conv."""
    slstm_forget_gate: str = "sigmoid"
    """sLSTM forget gate: "sigmoid" (log f = logsigmoid(f~), official) or "exp" (log f = f~)."""
    slstm_ffn: bool = True
    """Whether sLSTM blocks carry a gated FFN (the official default)."""
    ffn_proj_factor: float = 1.3
    """FFN hidden width = E * factor, rounded up to a multiple of 64."""
    ffn_act: str = "gelu"
    """FFN gate activation: gelu (official default), swish or relu."""
    ffn_bias: bool = False
    """Biases on the FFN projections."""
    backend: Backend = Backend.AUTO
    """Cell kernels: auto (Triton on CUDA when available, else native), native, triton, reference."""

    def __post_init__(self):
        for name in ("embedding_dim", "num_blocks", "mlstm_num_heads", "qkv_block_size",
                     "mlstm_conv_kernel_size", "chunk_size", "slstm_num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.slstm_conv_kernel_size, int) or self.slstm_conv_kernel_size < 0:
            raise ValueError(f"slstm_conv_kernel_size must be an int >= 0, got {self.slstm_conv_kernel_size!r}")
        if not isinstance(self.slstm_at, tuple) or any(not isinstance(b, int) for b in self.slstm_at):
            raise ValueError(f"slstm_at must be a tuple of block indices, got {self.slstm_at!r}")
        if any(not 0 <= b < self.num_blocks for b in self.slstm_at) or len(set(self.slstm_at)) != len(self.slstm_at):
            raise ValueError(f"slstm_at must hold distinct indices in [0, {self.num_blocks}), got {self.slstm_at}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")
        for name in ("mlstm_proj_factor", "ffn_proj_factor", "norm_eps", "cell_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.mlstm_inner_dim % self.mlstm_num_heads:
            raise ValueError(f"mlstm_num_heads {self.mlstm_num_heads} must divide the mLSTM inner width "
                             f"{self.mlstm_inner_dim} (embedding_dim * mlstm_proj_factor rounded up to 64)")
        if self.mlstm_inner_dim % self.qkv_block_size:
            raise ValueError(f"qkv_block_size {self.qkv_block_size} must divide the mLSTM inner width "
                             f"{self.mlstm_inner_dim}")
        if self.slstm_at and self.embedding_dim % self.slstm_num_heads:
            raise ValueError(f"slstm_num_heads {self.slstm_num_heads} must divide embedding_dim {self.embedding_dim}")
        if self.slstm_forget_gate not in FORGET_GATES:
            raise ValueError(f"slstm_forget_gate must be one of {FORGET_GATES}, got {self.slstm_forget_gate!r}")
        if self.ffn_act not in GatedFFN.ACTIVATIONS:
            raise ValueError(f"ffn_act must be one of {sorted(GatedFFN.ACTIVATIONS)}, got {self.ffn_act!r}")
        if self.backend not in {b.value for b in Backend}:
            raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {self.backend!r}")

    @property
    def mlstm_inner_dim(self) -> int:
        return round_up(self.embedding_dim * self.mlstm_proj_factor, 64)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.embedding_dim * self.ffn_proj_factor, 64)

    def replace(self, **changes) -> "StackConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready fields (slstm_at as a list, backend as its name)."""
        d = dataclasses.asdict(self)
        d["slstm_at"], d["backend"] = list(self.slstm_at), str(Backend(self.backend))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StackConfig":
        """Inverse of to_dict; unknown keys are an error, never silently dropped."""
        d = known_fields(cls, d)
        return cls(**{**d, "slstm_at": tuple(d.get("slstm_at", ()))})


class StackBlock(nn.Module):
    """x + layer(norm(x)), then x + ffn(ffn_norm(x)) when the block has an FFN."""

    def __init__(self, cfg: StackConfig, is_slstm: bool):
        super().__init__()
        E = cfg.embedding_dim
        self.is_slstm = is_slstm
        self.norm = nn.LayerNorm(E, eps=cfg.norm_eps, bias=False)
        if is_slstm:
            self.layer = SLSTMLayer(E, cfg.slstm_num_heads, conv_kernel_size=cfg.slstm_conv_kernel_size,
                                    forget_gate=cfg.slstm_forget_gate, norm_eps=cfg.norm_eps)
        else:
            self.layer = OriginalMLSTMLayer(E, cfg.mlstm_inner_dim, cfg.mlstm_num_heads,
                                            qkv_block_size=cfg.qkv_block_size,
                                            conv_kernel_size=cfg.mlstm_conv_kernel_size, use_bias=cfg.mlstm_bias,
                                            norm_eps=cfg.norm_eps, cell_eps=cfg.cell_eps, chunk_size=cfg.chunk_size)
        has_ffn = is_slstm and cfg.slstm_ffn
        self.ffn_norm = nn.LayerNorm(E, eps=cfg.norm_eps, bias=False) if has_ffn else None
        self.ffn = GatedFFN(E, cfg.ffn_dim, act=cfg.ffn_act, use_bias=cfg.ffn_bias) if has_ffn else None

    def forward(self, x, state: LayerState | None = None, *, backend: Backend):
        h, state = self.layer(self.norm(x), state, backend=backend)
        x = x + h
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x, state


class XLSTMStack(nn.Module):
    """The block stack on features: (B, T, E) -> (B, T, E) with one LayerState per block."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        if not isinstance(cfg, StackConfig):
            raise TypeError(f"cfg must be a StackConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.blocks = nn.ModuleList(StackBlock(cfg, i in cfg.slstm_at) for i in range(cfg.num_blocks))
        self.post_norm = (nn.LayerNorm(cfg.embedding_dim, eps=cfg.norm_eps, bias=False)
                          if cfg.add_post_blocks_norm else nn.Identity())
        self._backends: dict[str, Backend] = {}
        self.reset_parameters()

    def backend_for(self, device: torch.device) -> Backend:
        """The cell backend for ``device``, resolved once per device type and logged."""
        if device.type not in self._backends:
            # the chunk size steers AUTO only where mLSTM blocks use it (sLSTM kernels take any)
            has_mlstm = any(not b.is_slstm for b in self.blocks)
            chunk = self.cfg.chunk_size if has_mlstm else None
            self._backends[device.type] = resolve_backend(self.cfg.backend, device, chunk_size=chunk)
            log.info("fastxlstm: stack backend %s on %s", self._backends[device.type].value, device.type)
        return self._backends[device.type]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official inits (small_init, wang for the residual output projections, the sLSTM
        forget-gate power law by block position, mLSTM gate biases), norms at 1."""
        E, N = self.cfg.embedding_dim, self.cfg.num_blocks
        for idx, block in enumerate(self.blocks):
            if block.is_slstm:
                block.layer.reset_parameters(block_idx=idx, num_blocks=N)
            else:
                block.layer.reset_parameters(num_blocks=N)
            if block.ffn is not None:
                small_init_(block.ffn.proj_up.weight, E)
                wang_init_(block.ffn.proj_down.weight, E, N)
                for lin in (block.ffn.proj_up, block.ffn.proj_down):
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)

    def forward(self, x: torch.Tensor, state: list[LayerState] | None = None
                ) -> tuple[torch.Tensor, list[LayerState]]:
        """x (B, T, E) -> y (B, T, E) and the state after the last step (one LayerState per block)."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.embedding_dim or x.shape[1] == 0:
            raise ValueError(f"x must be (B, T >= 1, embedding_dim={self.cfg.embedding_dim}), got {tuple(x.shape)}")
        if state is not None and (not isinstance(state, (list, tuple)) or len(state) != len(self.blocks)):
            raise ValueError(f"state must be a list of {len(self.blocks)} LayerState (one per block), "
                             f"got {type(state).__name__}")
        backend = self.backend_for(x.device)
        states = state if state is not None else [None] * len(self.blocks)
        new_states = []
        for block, s in zip(self.blocks, states):
            x, s = block(x, s, backend=backend)
            new_states.append(s)
        return self.post_norm(x), new_states


class XLSTMStackLM(nn.Module):
    """Language model on the original xLSTM stack: logits, state = model(input_ids, state)."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        if not isinstance(cfg, StackConfig):
            raise TypeError(f"cfg must be a StackConfig, got {type(cfg).__name__}")
        if cfg.vocab_size is None:
            raise ValueError("vocab_size must be set in the StackConfig of a language model")
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.stack = XLSTMStack(cfg)
        self.lm_head = nn.Linear(cfg.embedding_dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embedding and (untied) LM head small_init(E), as the official LM; the stack's own inits."""
        small_init_(self.embedding.weight, self.cfg.embedding_dim)
        if not self.cfg.tie_word_embeddings:
            small_init_(self.lm_head.weight, self.cfg.embedding_dim)

    def forward(self, input_ids: torch.Tensor, state: list[LayerState] | None = None
                ) -> tuple[torch.Tensor, list[LayerState]]:
        """input_ids (B, T) integer -> logits (B, T, vocab) and the state after the last token."""
        x, state = self._hidden_states(input_ids, state)
        return self.logits(x), state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states (as ``hidden_states`` returns them)."""
        return self.lm_head(hidden)

    def hidden_states(self, input_ids: torch.Tensor, state: list[LayerState] | None = None
                      ) -> tuple[torch.Tensor, list[LayerState]]:
        """What the LM head reads (B, T, E) (after the post-blocks norm) and the state: ``forward``
        without the head, for losses that never form the logits."""
        return self._hidden_states(input_ids, state)

    def _hidden_states(self, input_ids, state):
        # one body behind both entry points: FSDP hooks each entry point, and nesting them would hook twice
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be an integer tensor (B, T), got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.cfg.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        return self.stack(self.embedding(input_ids), state)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
