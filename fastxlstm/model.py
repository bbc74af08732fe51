"""xLSTM-Large: embedding -> N x [RMSNorm -> mLSTM -> residual -> RMSNorm -> SwiGLU -> residual]
-> RMSNorm -> LM head with soft-capped logits.

State is a value: ``logits, state = model(input_ids, state)``, where state is a list with one
MLSTMState per block. Modules hold no cache, so a state can be forked, saved or dropped freely.
Parameter names equal those of the official ``xlstm`` package's xLSTMLarge, so its state dicts
load as they are.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import ModelConfig
from .layers.common import RMSNorm, SwiGLU, small_init_, soft_cap, wang_init_
from .layers.mlstm import MLSTMLayer
from .ops import Backend, MLSTMState, resolve_backend

log = logging.getLogger("fastxlstm")


class Block(nn.Module):
    """Pre-norm residual block: x + mLSTM(norm(x)), then x + FFN(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = dict(eps=cfg.norm_eps, use_bias=cfg.use_bias, force_float32=cfg.norm_reduction_force_float32)
        self.norm_mlstm = RMSNorm(cfg.embedding_dim, **norm)
        self.mlstm_layer = MLSTMLayer(
            cfg.embedding_dim, cfg.num_heads, cfg.qk_dim, cfg.v_dim, gate_soft_cap=cfg.gate_soft_cap,
            norm_eps=cfg.norm_eps, cell_eps=cfg.cell_eps, use_bias=cfg.use_bias,
            norm_reduction_force_float32=cfg.norm_reduction_force_float32, chunk_size=cfg.chunk_size)
        self.norm_ffn = RMSNorm(cfg.embedding_dim, **norm)
        self.ffn = SwiGLU(cfg.embedding_dim, cfg.ffn_dim, use_bias=cfg.use_bias)

    def forward(self, x, state: MLSTMState | None = None, *, backend: Backend, cu_seqlens=None):
        h, state = self.mlstm_layer(self.norm_mlstm(x), state, backend=backend, cu_seqlens=cu_seqlens)
        x, y = self.norm_ffn.add_forward(x, h)
        return x + self.ffn(y), state


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.out_norm = (RMSNorm(cfg.embedding_dim, eps=cfg.norm_eps, use_bias=cfg.use_bias,
                                 force_float32=cfg.norm_reduction_force_float32)
                         if cfg.add_out_norm else nn.Identity())

    def forward(self, x, state: list[MLSTMState] | None = None, *, backend: Backend, cu_seqlens=None
                ) -> tuple[torch.Tensor, list[MLSTMState]]:
        """Embeddings (B, T, E) through every block and the out norm; one module, so that
        torch.compile can take the stack as one graph."""
        states = state if state is not None else [None] * len(self.blocks)
        new_states = []
        for block, s in zip(self.blocks, states):  # cu_seqlens is checked by ops.mlstm
            x, s = block(x, s, backend=backend, cu_seqlens=cu_seqlens)
            new_states.append(s)
        return self.out_norm(x), new_states


class XLSTMLarge(nn.Module):
    """The xLSTM-Large language model (the xLSTM-7B architecture) at any size."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.embedding_dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embedding.weight
        self._backends: dict[str, Backend] = {}
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @property
    def config(self) -> ModelConfig:
        return self.cfg

    def backend_for(self, device: torch.device) -> Backend:
        """The cell backend for ``device``, resolved once per device type and logged."""
        key = device.type
        if key not in self._backends:
            self._backends[key] = resolve_backend(self.cfg.backend, device, chunk_size=self.cfg.chunk_size)
            log.info("fastxlstm: mLSTM backend %s on %s", self._backends[key].value, key)
        return self._backends[key]

    def forward(self, input_ids: torch.Tensor, state: list[MLSTMState] | None = None, *,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[MLSTMState]]:
        """input_ids (B, T) integer -> logits (B, T, vocab) (float32, or float64 for a float64 model) and
        the state after the last token.

        cu_seqlens: packed documents: input_ids is (1, T) holding N documents one after another,
        cu_seqlens (N + 1,) their offsets from 0 to T; every document starts from its own state
        (zeros, or row n of ``state``), exactly as if run alone, and the returned state has one row
        per document.
        """
        x, new_states = self._hidden_states(input_ids, state, cu_seqlens)
        return self.logits(x), new_states

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states (as ``hidden_states`` returns them): soft-capped logits,
        float32 (float64 for a float64 model). Prefill takes the last position's this way."""
        logits = self.lm_head(hidden)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()                      # the cap and the softmax need the range
        return soft_cap(logits, self.cfg.output_logit_soft_cap)

    def hidden_states(self, input_ids: torch.Tensor, state: list[MLSTMState] | None = None, *,
                      cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[MLSTMState]]:
        """What the LM head reads: the final-normed hidden states (B, T, E) and the state, as
        ``forward`` (same arguments) but without the head; for losses that never form the logits
        (``fastxlstm.loss.lm_head_loss`` with ``lm_head.weight`` and ``output_logit_soft_cap``)."""
        return self._hidden_states(input_ids, state, cu_seqlens)

    def _hidden_states(self, input_ids, state, cu_seqlens):
        # one body behind both entry points: FSDP hooks each entry point, and nesting them would hook twice
        self._check_inputs(input_ids, state, batch=None if cu_seqlens is None else len(cu_seqlens) - 1)
        backend = self.backend_for(input_ids.device)
        return self.backbone(self.embedding(input_ids), state, backend=backend, cu_seqlens=cu_seqlens)

    def init_state(self, batch_size: int, device=None) -> list[MLSTMState]:
        """Zero states for ``batch_size`` sequences (what ``state=None`` means)."""
        c = self.cfg
        device = device if device is not None else self.embedding.weight.device
        return [MLSTMState.zeros(batch_size, c.num_heads, c.qk_head_dim, c.v_head_dim, device=device)
                for _ in range(c.num_blocks)]

    @torch.no_grad()
    def init_weights(self) -> None:
        """The xLSTM-7B training recipe (the official model ships none; PyTorch defaults give N(0, 1)
        embeddings and wide uniform projections, which start training far from unit scale):
        small init std sqrt(2/(5E)) (Nguyen & Salazar 2019) for the embedding, the input projections
        and the LM head; Wang init std 2/(N sqrt(E)) for the residual output projections (out_proj,
        proj_down), so the residual stream grows slowly with depth; gate weights 0 with the input
        gate bias at igate_bias_init (nearly closed) and forget gate biases linspace(3, 6) over
        heads (long memory from the start); norms at 1, biases at 0.
        """
        c = self.cfg
        E, N = c.embedding_dim, c.num_blocks
        small_init_(self.embedding.weight, E)
        if not c.tie_word_embeddings:
            small_init_(self.lm_head.weight, E)
        for block in self.backbone.blocks:
            layer = block.mlstm_layer
            for lin in (layer.q, layer.k, layer.v, layer.ogate_preact, block.ffn.proj_up, block.ffn.proj_up_gate):
                small_init_(lin.weight, E)
            wang_init_(layer.out_proj.weight, E, N)
            wang_init_(block.ffn.proj_down.weight, E, N)
            nn.init.zeros_(layer.igate_preact.weight)
            nn.init.constant_(layer.igate_preact.bias, c.igate_bias_init)
            nn.init.zeros_(layer.fgate_preact.weight)
            layer.fgate_preact.bias.copy_(torch.linspace(3.0, 6.0, c.num_heads))
        for name, p in self.named_parameters():
            if name.endswith("bias") and "gate_preact" not in name:
                nn.init.zeros_(p)
            elif name.endswith("norm_mlstm.weight") or name.endswith("norm_ffn.weight") or \
                    name.endswith("out_norm.weight") or name.endswith("multihead_norm.weight"):
                nn.init.ones_(p)

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if exclude_embedding else n

    def extra_repr(self) -> str:
        backends = ", ".join(f"{k}: {v.value}" for k, v in self._backends.items()) or self.cfg.backend.value
        return f"params={self.num_params():,}, backend={backends}"

    def _check_inputs(self, input_ids: torch.Tensor, state, batch: int | None = None) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor of token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (batch, length >= 1), got {tuple(input_ids.shape)}")
        capturing = input_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.compiler.is_compiling() and input_ids.numel():
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()       # one host sync, not two
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"input_ids out of range: found ids in [{lo}, {hi}], "
                                 f"vocab_size is {self.cfg.vocab_size}")
        if state is None:
            return
        c = self.cfg
        if not isinstance(state, (list, tuple)) or len(state) != c.num_blocks:
            raise ValueError(f"state must be a list of {c.num_blocks} MLSTMState (one per block), "
                             f"got {type(state).__name__} of length {len(state) if hasattr(state, '__len__') else '?'}")
        B = input_ids.shape[0] if batch is None else batch
        expected = {"c": (B, c.num_heads, c.qk_head_dim, c.v_head_dim), "n": (B, c.num_heads, c.qk_head_dim),
                    "m": (B, c.num_heads)}
        for idx, s in enumerate(state):
            if not isinstance(s, MLSTMState):
                raise ValueError(f"state[{idx}] must be an MLSTMState, got {type(s).__name__}")
            for name, shape in expected.items():
                if tuple(getattr(s, name).shape) != shape:
                    raise ValueError(f"state[{idx}].{name} has shape {tuple(getattr(s, name).shape)}, but this "
                                     f"model and batch expect {shape}: was the state made by another config?")
