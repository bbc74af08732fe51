"""The public generation API: ``generate`` (all at once) and ``stream`` (token by token).

Prompts are token-id lists, or text with a tokenizer (the byte tokenizer for a 256-id model).
Each row of a batch generates exactly what it generates alone: prompts are prefilled at their exact
lengths (no padding), and sampling noise depends only on the row's seed and the step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..tokenizer import IncrementalDecoder, check_tokenizer, load_tokenizer
from .engine import GenerationStats, check_model, config_id, decode_steps, model_device, prefill
from .sampling import SamplingParams, row_keys
from .states import check_state

__all__ = ["generate", "stream", "TokenEvent", "encode_prompts"]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row, as ``stream`` yields it."""

    row: int
    token_id: int
    text: str
    """Text completed by this token: "" without a tokenizer, or while a character or a possible stop
    string is unfinished (held back, then emitted with a later token)."""
    finish_reason: str | None
    """None while the row goes on; else "length" (max_new_tokens), "eos" or "stop" (a stop string)."""


def generate(model, prompts, *, max_new_tokens: int = 128, **options):
    """Generate continuations of ``prompts``; greedy unless a sampling option is given.

    Args:
        model: an XLSTMLarge or an XLSTMStackLM (any device and dtype; the stack decodes eagerly,
            never in a CUDA graph).
        prompts: a list of token-id lists (returns a list of new-token-id lists), a list of
            strings (returns the list of generated texts) or one string (returns one text).
        max_new_tokens: tokens generated per row at most (>= 1).
        **options: those of ``stream``.
    Each row stops at max_new_tokens, at an eos id (included in its tokens) or when a stop string
    appears (the text is cut before it; the tokens end with the one that completed it).
    """
    job = _Job(model, prompts, max_new_tokens=max_new_tokens, **options)
    tokens: list[list[int]] = [[] for _ in job.prompts]
    texts: list[list[str]] = [[] for _ in job.prompts]
    for ev in job.run():
        tokens[ev.row].append(ev.token_id)
        texts[ev.row].append(ev.text)
    if not job.text_mode:
        return tokens
    out = ["".join(t) for t in texts]
    return out[0] if job.single else out


def stream(model, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
           seed: int | Sequence[int] | None = None, eos_token_id: int | Sequence[int] | None | str = "config",
           stop: str | Sequence[str] | None = None, tokenizer=None, add_bos: bool | None = None,
           state: list | None = None, max_prompt_tokens: int | None = None,
           cuda_graph: bool | None = None, steps_per_graph: int | None = None, compile: bool = False,
           fused: bool | None = None, stats: GenerationStats | None = None) -> Iterator[TokenEvent]:
    """Yield a TokenEvent per generated token as soon as it exists (rows interleaved step by step).

    Args:
        temperature, top_k, top_p, min_p, repetition_penalty: see SamplingParams (temperature 0,
            the default, is greedy).
        seed: row r samples with seed + r (an int), seed[r] (a list), or a seed drawn from torch's
            global generator (None), so ``torch.manual_seed`` also makes runs reproducible.
        eos_token_id: "config" (the model config's eos), None (never stop early), an id or ids.
        stop: stop string(s); needs a tokenizer (or a 256-id byte model).
        tokenizer: encodes text prompts and decodes output (default: bytes for a 256-id model).
        add_bos: prepend the config's BOS id; default True for text prompts, False for token ids.
        state: one state row per prompt to continue from (e.g. a cached or forked prefix state).
        max_prompt_tokens: longer prompts are an error (None: no limit).
        cuda_graph: capture the decode step in a CUDA graph (default: on a CUDA model).
        steps_per_graph: decode steps per graph replay (tokens arrive in blocks of this many);
            default 4 at batch 1 rising to 32 at batch >= 32, where the state copy is larger.
        compile: run the decode step through torch.compile (optional; the first step compiles).
        fused: decode an XLSTMLarge through the fused step (one GEMM for the q/k/v/gate
            projections, one for the FFN's gate and up, fused elementwise work; the same tokens to
            the dtype's rounding). Default: on CUDA. It holds a copy of those weights while decoding
            (9 GB for the 7B in bf16); False decodes through ``model(token, state)``.
        stats: a GenerationStats to fill with timings and memory.
    Stopping the iteration early stops the generation.
    """
    return _Job(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                eos_token_id=eos_token_id, stop=stop, tokenizer=tokenizer, add_bos=add_bos, state=state,
                max_prompt_tokens=max_prompt_tokens, cuda_graph=cuda_graph, steps_per_graph=steps_per_graph,
                compile=compile, fused=fused, stats=stats).run()


def encode_prompts(model, prompts, *, tokenizer=None, add_bos: bool | None = None,
                   max_prompt_tokens: int | None = None):
    """Validate and tokenize prompts -> (token lists, text_mode, single, tokenizer or None)."""
    check_model(model)
    cfg = model.cfg
    bos_id = config_id(cfg, "bos_token_id")
    single = isinstance(prompts, str)
    if single:
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"a tensor of prompts must be (batch, length), got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists or of strings")
    kinds = {"text" if isinstance(p, str) else "ids" for p in prompts}
    if len(kinds) > 1:
        raise ValueError("prompts mix strings and token-id lists: pass one kind")
    text_mode = kinds == {"text"}
    if text_mode or tokenizer is not None:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None, cfg.vocab_size)
        check_tokenizer(tokenizer, cfg.vocab_size)
    if add_bos is None:
        add_bos = text_mode and bos_id is not None
    if add_bos and bos_id is None:
        raise ValueError("add_bos=True, but the model config has no bos_token_id")
    out = []
    for r, p in enumerate(prompts):
        if text_mode:
            ids = tokenizer.encode(p)
        else:
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            if not isinstance(p, (list, tuple)):
                raise ValueError(f"prompt {r} must be a list of token ids, got {type(p).__name__}"
                                 " (a single prompt is written [[id, id, ...]])")
            ids = list(p)
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)]
            if bad:
                raise ValueError(f"prompt {r} holds non-integer token ids, e.g. {bad[0]!r}")
        if not ids:
            hint = f" (e.g. the BOS id {bos_id})" if bos_id is not None else ""
            raise ValueError(f"prompt {r} is empty: give at least one token{hint} to generate from")
        if add_bos:
            ids = [bos_id] + ids
        out_of_range = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if out_of_range:
            raise ValueError(f"prompt {r} has token id {out_of_range[0]} outside [0, {cfg.vocab_size}) "
                             "(the model's vocab_size)")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise ValueError(f"prompt {r} has {len(ids)} tokens, more than max_prompt_tokens={max_prompt_tokens}")
        out.append(ids)
    return out, text_mode, single, tokenizer


class _Job:
    """One generation: validated inputs, then ``run()`` yields TokenEvents."""

    def __init__(self, model, prompts, *, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
                 min_p=0.0, repetition_penalty=1.0, seed=None, eos_token_id="config", stop=None,
                 tokenizer=None, add_bos=None, state=None, max_prompt_tokens=None, cuda_graph=None,
                 steps_per_graph=None, compile=False, fused=None, stats=None):
        if not hasattr(model, "cfg") or not callable(model):
            raise TypeError(f"model must be a fastxlstm model, got {type(model).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens must be None or an int >= 1, got {max_prompt_tokens!r}")
        if steps_per_graph is not None and (isinstance(steps_per_graph, bool) or not isinstance(steps_per_graph, int)
                                            or steps_per_graph < 1):
            raise ValueError(f"steps_per_graph must be None or an int >= 1, got {steps_per_graph!r}")
        self.model = model
        self.params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                     repetition_penalty=repetition_penalty)
        self.prompts, self.text_mode, self.single, self.tokenizer = encode_prompts(
            model, prompts, tokenizer=tokenizer, add_bos=add_bos, max_prompt_tokens=max_prompt_tokens)
        B, V = len(self.prompts), model.cfg.vocab_size
        self.max_new_tokens = max_new_tokens
        self.eos = _eos_ids(eos_token_id, model.cfg)
        bad = [e for e in self.eos if not 0 <= e < V]
        if bad:
            raise ValueError(f"eos_token_id {bad[0]} is outside [0, {V})")
        self.stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stops!r}")
        if self.stops and self.tokenizer is None:
            if V != 256:
                raise ValueError("stop strings need a tokenizer to read the output: pass tokenizer=")
            self.tokenizer = load_tokenizer(None, V)
        self.seeds = _seeds(seed, B)
        if state is not None:
            check_state(model, state, B)
        self.state = state
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        self.cuda_graph, self.steps_per_graph, self.stats = cuda_graph, steps_per_graph, stats
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.compile, self.fused = compile, fused

    def run(self) -> Iterator[TokenEvent]:
        model, B = self.model, len(self.prompts)
        device = model_device(model)
        stats, cuda = self.stats, device.type == "cuda"
        t0 = time.perf_counter()
        if stats is not None:
            stats.batch_size, stats.prompt_tokens = B, sum(map(len, self.prompts))
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
        seen = None
        if self.params.uses_history:
            seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
            for r, p in enumerate(self.prompts):
                seen[r, torch.tensor(p, device=device)] = True
        state, logits = prefill(model, self.prompts, self.state)
        if stats is not None:
            if cuda:
                torch.cuda.synchronize(device)
            stats.prefill_s = time.perf_counter() - t0
        rows = [_RowText(self.tokenizer, self.stops) if self.tokenizer is not None else None for _ in range(B)]
        finished: list[str | None] = [None] * B
        count = [0] * B
        live = B
        steps = decode_steps(model, state, logits, self.params, row_keys(self.seeds), self.max_new_tokens,
                             seen=seen, cuda_graph=self.cuda_graph, steps_per_graph=self.steps_per_graph,
                             compile=self.compile, fused=self.fused, stats=stats)
        del state, logits
        try:
            for block in steps:
                if stats is not None and not stats.first_token_s:
                    stats.first_token_s = time.perf_counter() - t0
                block = block.tolist()
                for j in range(len(block[0])):
                    for r in range(B):
                        if finished[r] is not None:
                            continue
                        t = block[r][j]
                        count[r] += 1
                        text, hit = rows[r].push(t) if rows[r] is not None else ("", False)
                        reason = ("stop" if hit else "eos" if t in self.eos
                                  else "length" if count[r] >= self.max_new_tokens else None)
                        if reason in ("eos", "length") and rows[r] is not None:
                            more, hit = rows[r].finish()
                            text += more
                            reason = "stop" if hit else reason
                        if reason is not None:
                            finished[r] = reason
                            live -= 1
                        yield TokenEvent(r, t, text, reason)
                    if stats is not None and cuda:             # sampled while the decoder is alive
                        n = max(count)
                        if n & (n - 1) == 0 or not live:
                            stats.memory_allocated[n] = torch.cuda.memory_allocated(device)
                    if not live:
                        return
        finally:
            steps.close()
            if stats is not None:
                stats.new_tokens = max(count)
                if cuda:
                    stats.peak_memory = torch.cuda.max_memory_allocated(device)


class _RowText:
    """A row's text: incremental decoding, with text that may begin a stop string held back."""

    def __init__(self, tokenizer, stops: list[str]):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = stops
        self.pending = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text that is now final, whether a stop string appeared)."""
        self.pending += self.decoder.push(token_id)
        return self._release()

    def finish(self) -> tuple[str, bool]:
        self.pending += self.decoder.flush()
        text, hit = self._release()
        rest, self.pending = ("", "") if hit else (self.pending, "")
        return text + rest, hit

    def _release(self) -> tuple[str, bool]:
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.pending = self.pending[:min(hits)], ""
            return text, True
        keep = 0                                  # longest tail that could still grow into a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False


def _eos_ids(eos_token_id, cfg) -> set[int]:
    if isinstance(eos_token_id, str):
        if eos_token_id != "config":
            raise ValueError(f"eos_token_id must be 'config', None, an id or a list of ids, got {eos_token_id!r}")
        eos = config_id(cfg, "eos_token_id")
        return set() if eos is None else {eos}
    if eos_token_id is None:
        return set()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(e, bool) or not isinstance(e, int) for e in ids):
        raise ValueError(f"eos_token_id must be an id or a list of ids, got {eos_token_id!r}")
    return set(ids)


def _seeds(seed, B: int) -> list[int]:
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, int) and not isinstance(seed, bool):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        return [seed + r for r in range(B)]
    seeds = list(seed)
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for {B} prompts: give one per prompt, or one int")
    return seeds
