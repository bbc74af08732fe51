"""Interop with the official ``xlstm`` package (2.0.6): its NeurIPS ``xLSTMLMModel`` -> ours.

``convert_official(config_dict, state_dict)`` reads the nested config dict of xLSTMLMModelConfig
(as in the official YAML examples, i.e. what goes into ``dacite.from_dict``) and that model's
state_dict, and returns an XLSTMStackLM computing the same logits.

Traps handled here (see the official-xlstm reference notes, sections 2c and 3.6):
- the official sLSTM layer feeds its module ``fgate`` into the cell's i slot and ``igate`` into
  the f slot; we name weights by the gate they feed;
- the stored sLSTM recurrent kernel and bias layouts depend on the backend the model was built
  with ("vanilla" or "cuda"); both map to our one layout;
- official LayerNorms store (scale - 1); we store the scale.
Dropout settings are ignored (they do not change eval-mode outputs).
"""

from __future__ import annotations

import math

import torch

from .layers.common import GatedFFN, round_up
from .stack import StackConfig, XLSTMStackLM

# official defaults (xlstm 2.0.6 dataclasses); keys not listed here are rejected
_MLSTM_LAYER = dict(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=4, proj_factor=2.0,
                    round_proj_up_dim_up=True, round_proj_up_to_multiple_of=64, embedding_dim=None,
                    bias=False, dropout=0.0, context_length=-1)
_SLSTM_LAYER = dict(num_heads=4, conv1d_kernel_size=4, group_norm_weight=True, dropout=0.0, backend="cuda",
                    function="slstm", bias_init="powerlaw_blockdependent", recurrent_weight_init="zeros",
                    num_gates=4, gradient_recurrent_cut=False, gradient_recurrent_clipval=None,
                    forward_clipval=None, batch_size=8, dtype="bfloat16", dtype_b="float32", dtype_r=None,
                    dtype_w=None, dtype_g=None, dtype_s=None, dtype_a=None,
                    enable_automatic_mixed_precision=True, initial_val=0.0, embedding_dim=None,
                    hidden_size=None, num_states=4, input_shape="BSGNH", internal_input_shape="SBNGH",
                    output_shape="BNSH", constants=None)
_FFN = dict(proj_factor=1.3, act_fn="gelu", embedding_dim=None, dropout=0.0, bias=False, ff_type="ffn_gated",
            round_proj_up_dim_up=True, round_proj_up_to_multiple_of=64)
_LM = dict(mlstm_block=None, slstm_block=None, context_length=-1, num_blocks=1, embedding_dim=128,
           add_post_blocks_norm=True, bias=False, dropout=0.0, slstm_at=(), vocab_size=-1, tie_weights=False,
           weight_decay_on_embedding=False, add_embedding_dropout=False)


def convert_official(config: dict, state_dict: dict[str, torch.Tensor]) -> XLSTMStackLM:
    """Build our XLSTMStackLM from an official xLSTMLMModel config dict and state_dict."""
    cfg, slstm_backend = stack_config_from_official(config)
    model = XLSTMStackLM(cfg)
    ours = _map_state_dict(cfg, slstm_backend, state_dict)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"state_dict does not fit the config: missing {missing}, unexpected {unexpected}")
    return model


def stack_config_from_official(config: dict) -> tuple[StackConfig, str]:
    """Our StackConfig and the official sLSTM backend name ("vanilla" or "cuda") for a config dict."""
    lm = _fields("config", config, _LM)
    E, N = lm["embedding_dim"], lm["num_blocks"]
    mblock = _fields("mlstm_block", lm["mlstm_block"], {"mlstm": None}) if lm["mlstm_block"] is not None else None
    sblock = (_fields("slstm_block", lm["slstm_block"], {"slstm": None, "feedforward": {}})
              if lm["slstm_block"] is not None else None)
    slstm_at = lm["slstm_at"]
    if mblock is None or slstm_at == "all":
        slstm_at = list(range(N))
    if slstm_at and sblock is None:
        raise ValueError(f"slstm_at={slstm_at} needs a slstm_block in the config")
    kw: dict = dict(embedding_dim=E, num_blocks=N, slstm_at=tuple(slstm_at), vocab_size=lm["vocab_size"],
                    tie_word_embeddings=lm["tie_weights"], add_post_blocks_norm=lm["add_post_blocks_norm"],
                    backend="auto")
    if mblock is not None:
        m = _fields("mlstm_block.mlstm", mblock["mlstm"] or {}, _MLSTM_LAYER)
        inner = _proj_dim(E, m, "mlstm_block.mlstm")
        kw.update(mlstm_num_heads=m["num_heads"], mlstm_proj_factor=_factor_for(E, inner),
                  qkv_block_size=m["qkv_proj_blocksize"], mlstm_conv_kernel_size=m["conv1d_kernel_size"],
                  mlstm_bias=lm["bias"])          # the official stack overrides the layer's own bias flag
    backend = "vanilla"
    if sblock is not None:
        s = _fields("slstm_block.slstm", sblock["slstm"] or {}, _SLSTM_LAYER)
        if s["function"] != "slstm" or s["num_gates"] != 4:
            raise ValueError(f"slstm_block.slstm.function must be 'slstm' with 4 gates, got {s['function']!r}")
        if s["backend"] not in ("vanilla", "cuda"):
            raise ValueError(f"slstm_block.slstm.backend must be 'vanilla' or 'cuda', got {s['backend']!r}")
        if s["forward_clipval"] is not None or s["gradient_recurrent_clipval"] is not None:
            raise ValueError("slstm clipping options (forward_clipval, gradient_recurrent_clipval) are not supported")
        backend = s["backend"]
        kw.update(slstm_num_heads=s["num_heads"], slstm_conv_kernel_size=s["conv1d_kernel_size"])
        ff = sblock["feedforward"]
        kw["slstm_ffn"] = ff is not None
        if ff is not None:
            f = _fields("slstm_block.feedforward", ff, _FFN)
            if f["act_fn"] not in GatedFFN.ACTIVATIONS:
                raise ValueError(f"slstm_block.feedforward.act_fn must be one of {sorted(GatedFFN.ACTIVATIONS)}, "
                                 f"got {f['act_fn']!r}")
            kw.update(ffn_proj_factor=_factor_for(E, _proj_dim(E, f, "slstm_block.feedforward")),
                      ffn_act=f["act_fn"], ffn_bias=f["bias"])
    return StackConfig(**kw), backend


def _fields(where: str, given, defaults: dict) -> dict:
    if not isinstance(given, dict):
        raise ValueError(f"{where} must be a dict, got {type(given).__name__}")
    unknown = [k for k in given if k not in defaults and not k.startswith("_")]
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")
    return {**defaults, **{k: v for k, v in given.items() if not k.startswith("_")}}


def _proj_dim(E: int, layer: dict, where: str) -> int:
    """The official up-projection width: E * proj_factor rounded up (or down) to a multiple."""
    mult = layer["round_proj_up_to_multiple_of"]
    q = E * layer["proj_factor"] / mult
    dim = int((math.ceil(q) if layer["round_proj_up_dim_up"] else math.floor(q)) * mult)
    if dim % 64:
        raise ValueError(f"{where}: projection width {dim} is not a multiple of 64, which this stack requires")
    return dim


def _factor_for(E: int, dim: int) -> float:
    """A proj factor whose width (E * factor rounded up to 64) is exactly ``dim``: dim / E, nudged
    down by ulps where E * (dim / E) rounds to just above dim."""
    factor = dim / E
    while round_up(E * factor, 64) > dim:
        factor = math.nextafter(factor, 0.0)
    return factor


def _map_state_dict(cfg: StackConfig, slstm_backend: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"official state_dict has no key {key!r}")
        return sd.pop(key)

    out["embedding.weight"] = take("token_embedding.weight")
    if "lm_head.weight" in sd:
        head = take("lm_head.weight")
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = head
    if cfg.add_post_blocks_norm:
        out["stack.post_norm.weight"] = take("xlstm_block_stack.post_blocks_norm.weight") + 1.0
    E, H = cfg.embedding_dim, cfg.slstm_num_heads
    D = E // H
    for idx in range(cfg.num_blocks):
        src, dst = f"xlstm_block_stack.blocks.{idx}.", f"stack.blocks.{idx}."
        out[dst + "norm.weight"] = take(src + "xlstm_norm.weight") + 1.0
        if idx in cfg.slstm_at:
            x = src + "xlstm."
            if cfg.slstm_conv_kernel_size > 0:
                out[dst + "layer.conv.weight"] = take(x + "conv1d.conv.weight")[:, 0, :]
                out[dst + "layer.conv.bias"] = take(x + "conv1d.conv.bias")
            # cell slots i, f, z, o are fed by the modules fgate, igate, zgate, ogate (official swap)
            out[dst + "layer.gate_weight"] = torch.stack(
                [take(x + f"{g}gate.weight") for g in ("f", "i", "z", "o")], dim=1)
            r = take(x + "slstm_cell._recurrent_kernel_")
            b = take(x + "slstm_cell._bias_")
            if slstm_backend == "vanilla":            # R stored (H, 4*D_out, D_in), bias (4, H, D)
                out[dst + "layer.recurrent_weight"] = r.reshape(H, 4, D, D).permute(0, 3, 1, 2).contiguous()
                out[dst + "layer.bias"] = b.reshape(4, H, D).permute(1, 0, 2).contiguous()
            else:                                     # cuda: R stored (H, D_in, 4*D_out), bias (H, 4, D)
                out[dst + "layer.recurrent_weight"] = r.reshape(H, D, 4, D).contiguous()
                out[dst + "layer.bias"] = b.reshape(H, 4, D).contiguous()
            gn = sd.pop(x + "group_norm.weight", None)
            out[dst + "layer.group_norm.weight"] = gn + 1.0 if gn is not None else torch.ones(E)
            if cfg.slstm_ffn:
                out[dst + "ffn_norm.weight"] = take(src + "ffn_norm.weight") + 1.0
                for name in ("proj_up", "proj_down"):
                    for p in ("weight", "bias"):
                        if src + f"ffn.{name}.{p}" in sd:
                            out[dst + f"ffn.{name}.{p}"] = take(src + f"ffn.{name}.{p}")
        else:
            x = src + "xlstm."
            for name in ("proj_up", "proj_down", "q_proj", "k_proj", "v_proj"):
                for p in ("weight", "bias"):
                    if x + f"{name}.{p}" in sd:
                        out[dst + f"layer.{name}.{p}"] = take(x + f"{name}.{p}")
            out[dst + "layer.conv.weight"] = take(x + "conv1d.conv.weight")[:, 0, :]
            out[dst + "layer.conv.bias"] = take(x + "conv1d.conv.bias")
            for g in ("igate", "fgate"):
                out[dst + f"layer.{g}.weight"] = take(x + f"mlstm_cell.{g}.weight")
                out[dst + f"layer.{g}.bias"] = take(x + f"mlstm_cell.{g}.bias")
            out[dst + "layer.outnorm.weight"] = take(x + "mlstm_cell.outnorm.weight") + 1.0
            out[dst + "layer.learnable_skip"] = take(x + "learnable_skip")
    if sd:
        raise ValueError(f"official state_dict has keys this config does not use: {sorted(sd)[:8]}")
    return out
