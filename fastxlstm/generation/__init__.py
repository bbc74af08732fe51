"""Inference: generation over a fixed-size recurrent state, states as values, scoring.

    generate(model, prompts, max_new_tokens=N, ...)   all at once (greedy unless asked to sample)
    stream(model, prompts, ...)                       a TokenEvent per token as it is generated
    score(model, text)                                log-likelihood / perplexity, constant memory
    prefill(model, prompts) -> (state, last logits)   a prompt's state, to fork, save or continue
    fork / select_rows / concat / save_state / load_state

Files: api.py (generate, stream), engine.py (prefill, eager and CUDA-graph decode), fused.py (the
fused XLSTMLarge decode step used on CUDA), sampling.py (token choice), scoring.py (score),
states.py (state values and their files).
"""

from .api import TokenEvent, encode_prompts, generate, stream
from .engine import GenerationStats, prefill
from .sampling import SamplingParams
from .scoring import ScoreResult, score
from .states import concat, fork, load_state, save_state, select_rows

__all__ = ["generate", "stream", "score", "prefill", "TokenEvent", "ScoreResult", "GenerationStats",
           "SamplingParams", "fork", "select_rows", "concat", "save_state", "load_state", "encode_prompts"]
