"""Hugging Face ``transformers`` bridge (extra ``hf``): run a fastxlstm model under ``generate()`` and
the text-generation pipeline, and write directories that ``transformers``' own xLSTMForCausalLM loads.

    hf_model = fastxlstm.hf.to_hf(model)          # shares the weights, no copy
    hf_model.generate(input_ids, max_new_tokens=20, do_sample=True, top_p=0.9)
    transformers.pipeline("text-generation", model=hf_model, tokenizer=tok)("Hello")
    hf_model.save_pretrained("out/hf")            # config.json (model_type "xlstm") + safetensors
    transformers.xLSTMForCausalLM.from_pretrained("out/hf")   # the same logits

The wrapper's parameter names are those of xLSTMForCausalLM (``backbone.embeddings``,
``backbone.blocks.*``, ``backbone.out_norm``, ``lm_head``): the same modules as the wrapped model,
registered under the published names. The recurrent state travels as ``FastXLSTMCache``; a
padded batch (an attention mask with zeros) is refused, because pads would enter the recurrent
state: ``fastxlstm.generate`` runs batches of different lengths exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:
    from transformers import GenerationMixin, PreTrainedModel, xLSTMConfig
    from transformers.utils import ModelOutput
except ImportError as e:  # an optional extra: say how to get it
    raise ImportError("fastxlstm.hf needs transformers >= 5.0 (with xLSTM): pip install 'fastxlstm[hf]'") from e

from .checkpoint import config_from_hf
from .config import ModelConfig
from .model import XLSTMLarge
from .ops import MLSTMState

__all__ = ["FastXLSTMForCausalLM", "FastXLSTMCache", "hf_config", "to_hf"]


def hf_config(cfg: ModelConfig) -> xLSTMConfig:
    """The transformers xLSTMConfig describing the same architecture as ``cfg``."""
    if not cfg.add_out_norm:
        raise ValueError("add_out_norm=False cannot be expressed for transformers' xLSTM (it always has out_norm)")
    return xLSTMConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embedding_dim, num_hidden_layers=cfg.num_blocks,
        num_heads=cfg.num_heads, use_bias=cfg.use_bias, norm_reduction_force_float32=cfg.norm_reduction_force_float32,
        tie_word_embeddings=cfg.tie_word_embeddings, add_out_norm=cfg.add_out_norm, norm_eps=cfg.norm_eps,
        qk_dim_factor=cfg.qk_dim_factor, v_dim_factor=cfg.v_dim_factor, chunk_size=cfg.chunk_size, eps=cfg.cell_eps,
        ffn_proj_factor=cfg.ffn_proj_factor, ffn_round_up_to_multiple_of=cfg.ffn_round_up_to_multiple_of,
        gate_soft_cap=cfg.gate_soft_cap, output_logit_soft_cap=cfg.output_logit_soft_cap,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        architectures=["xLSTMForCausalLM"])


def to_hf(model: XLSTMLarge) -> "FastXLSTMForCausalLM":
    """Wrap ``model`` for transformers; the wrapper and the model share every parameter."""
    if not isinstance(model, XLSTMLarge):
        raise TypeError(f"to_hf needs an XLSTMLarge, got {type(model).__name__}")
    return FastXLSTMForCausalLM(hf_config(model.cfg), model=model)


class FastXLSTMCache:
    """The recurrent state between generate() steps: one MLSTMState per block, and the tokens seen."""

    def __init__(self, state: list[MLSTMState], seen_tokens: int):
        self.state = state
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> "FastXLSTMCache":
        """Keep the rows beam_idx (beam search), in place: transformers 5 ignores the return value
        (returning a reordered copy left every beam on the state of the wrong one)."""
        idx = beam_idx.to(self.state[0].c.device)
        self.state = [MLSTMState(*(t.index_select(0, idx) for t in s)) for s in self.state]
        return self


@dataclass
class FastXLSTMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: FastXLSTMCache | None = None


class FastXLSTMForCausalLM(PreTrainedModel, GenerationMixin):
    """A fastxlstm XLSTMLarge behind the transformers causal-LM interface."""

    config_class = xLSTMConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _is_stateful = True
    _supports_cache_class = False

    def __init__(self, config: xLSTMConfig, model: XLSTMLarge | None = None):
        super().__init__(config)
        if model is None:
            model = XLSTMLarge(config_from_hf(config.to_dict()))
        # the wrapped model is not registered a second time: its modules are, under the published names
        object.__setattr__(self, "fastxlstm_model", model)
        self.backbone = nn.Module()
        self.backbone.embeddings = model.embedding
        self.backbone.blocks = model.backbone.blocks
        self.backbone.out_norm = model.backbone.out_norm
        self.lm_head = model.lm_head
        self.post_init()

    def _init_weights(self, module):            # weights come from the wrapped model or the checkpoint
        pass

    def _reorder_cache(self, cache: FastXLSTMCache | None, beam_idx: torch.LongTensor) -> FastXLSTMCache | None:
        # beam search's hook, tried before the cache's own reorder_cache (None: use_cache=False)
        return cache.reorder_cache(beam_idx) if cache is not None else None

    def get_input_embeddings(self):
        return self.backbone.embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, cache: FastXLSTMCache | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, inputs_embeds=None, return_dict: bool | None = None,
                **kwargs) -> FastXLSTMOutput:
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if attention_mask is not None and cache is None and not bool(attention_mask.all()):
            raise ValueError("attention_mask has padding: pads would enter the recurrent state; generate the "
                             "prompts one by one, or use fastxlstm.generate, which runs mixed lengths exactly")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        logits, state = self.fastxlstm_model(input_ids, cache.state if cache is not None else None)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        seen = (cache.seen_tokens if cache is not None else 0) + input_ids.shape[1]
        return FastXLSTMOutput(loss=loss, logits=logits, cache=FastXLSTMCache(state, seen) if use_cache else None)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write a directory that transformers' own xLSTMForCausalLM (and AutoModelForCausalLM) loads."""
        import json
        import os

        out = super().save_pretrained(save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "config.json")
        with open(path) as f:
            raw = json.load(f)
        raw["architectures"] = ["xLSTMForCausalLM"]
        with open(path, "w") as f:
            json.dump(raw, f, indent=2, sort_keys=True)
        return out

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        # carry the state ourselves: the name transformers uses for a cache has changed across versions
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["cache"] = outputs.cache
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids, cache: FastXLSTMCache | None = None,
                                      attention_mask=None, use_cache=None, **kwargs):
        # with a state, only the newest token is new to the model
        if cache is None:
            cache = next((v for k, v in kwargs.items() if isinstance(v, FastXLSTMCache)), None)
        if cache is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask if cache is None else None,
                "use_cache": use_cache}
