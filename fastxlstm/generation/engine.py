"""Prefill and decode over an explicit fixed-size recurrent state.

prefill: every prompt is consumed at its exact length by the chunkwise forward. Rows of equal
    length run together, rows of other lengths in their own calls: there is no padding at all, so
    a pad can never leak into a recurrent state, and a row of a batch computes exactly what it
    computes alone. Long prompts run in fixed-length pieces, the state carried between them; the
    piece length depends only on the model, never on the batch, so a prompt is cut the same way
    alone or in a batch. Only each prompt's last position goes through the LM head.
decode: one step is ``model(token (B, 1), state)`` (the step kernels) plus the token choice, all
    fixed-shape; on CUDA an XLSTMLarge steps through fused.FusedStep (the same step in far fewer
    kernels). On CUDA, for an XLSTMLarge, ``steps_per_graph`` steps are captured in one CUDA
    graph over static buffers (the state is copied back into them once per replay, not once per
    step) and replays are pipelined with the copy of their tokens to the host; on the CPU the same
    code runs eagerly. Memory does not grow with the number of generated tokens. The original stack (XLSTMStackLM) always decodes eagerly:
    its forward validates token ids on the host, which a CUDA graph cannot capture.

Both model kinds are supported: XLSTMLarge (state: one MLSTMState per block) and XLSTMStackLM
(state: one LayerState(conv, cell) per block); the state is handled leaf by leaf (states.tree_map).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .fused import FusedStep
from .sampling import SamplingParams, choose
from .states import check_state, tree_map

__all__ = ["prefill", "decode_steps", "GenerationStats"]

# Logit elements per scoring call (rows x piece x vocab): 2^28 float32 is 1 GiB; it sets the piece
# length of prefill and scoring alike, so both cut a prompt the same way.
_LOGIT_BUDGET = 1 << 28
# Tokens per prefill call (rows x piece): prefill forms the logits of each prompt's last position
# only, so what bounds a call is the activations of one forward.
_TOKEN_BUDGET = 1 << 16


@dataclass
class GenerationStats:
    """Timings and memory of one generation (filled in when passed as ``stats=``)."""

    batch_size: int = 0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    first_token_s: float = 0.0
    """From the call to the first new token of every row being on the host."""
    capture_s: float = 0.0
    """CUDA graph warm-up (its steps are real) and capture."""
    decode_steps: int = 0
    """Decode steps timed in decode_s (after warm-up and capture)."""
    decode_s: float = 0.0
    new_tokens: int = 0
    memory_allocated: dict[int, int] = field(default_factory=dict)
    """CUDA bytes allocated during decoding, keyed by new tokens per row so far (sampled at powers of
    two and at the last token, before the decoder's buffers are released)."""
    peak_memory: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.decode_steps / self.decode_s if self.decode_s else float("nan")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_model(model) -> None:
    """Generation runs XLSTMLarge and the original stack's language model (XLSTMStackLM)."""
    from ..model import XLSTMLarge
    from ..stack import XLSTMStackLM

    if not isinstance(model, (XLSTMLarge, XLSTMStackLM)):
        raise ValueError(f"generation supports XLSTMLarge and XLSTMStackLM models, got {type(model).__name__}")


def supports_cuda_graph(model) -> bool:
    """Whether the decode step can be captured in a CUDA graph: XLSTMLarge only (the stack's
    forward checks token ids on the host, a sync that graph capture forbids)."""
    from ..model import XLSTMLarge

    return isinstance(getattr(model, "_orig_mod", model), XLSTMLarge)


def config_id(cfg, name: str) -> int | None:
    """A special token id of the config (bos/eos/pad), None where the config has no such field."""
    return getattr(cfg, name, None)


_DEFAULT_CHUNK = 64


def prefill_piece(model) -> int:
    """Prefill piece length: bounded logits, a whole number of chunks, fixed for the model."""
    cfg = model.cfg
    chunk = getattr(cfg, "chunk_size", None) or _DEFAULT_CHUNK
    piece = max(_LOGIT_BUDGET // cfg.vocab_size, chunk)
    return max(piece // chunk * chunk, chunk)


@torch.inference_mode()
def prefill(model, prompts: list[list[int]], state: list | None = None) -> tuple[list, torch.Tensor]:
    """Consume each prompt (exact length, no padding) and return (state after each prompt,
    logits (B, V) at each prompt's last token, float32 or float64 for a float64 model). ``state``: rows to start from, or None
    for zeros. Prompts are assumed validated (see ``api.encode_prompts``)."""
    check_model(model)
    device = model_device(model)
    B = len(prompts)
    if state is not None:
        check_state(model, state, B)
    piece = prefill_piece(model)
    out_state: list | None = None                   # allocated from the first result (float32/float64)
    out_logits: torch.Tensor | None = None
    by_length: dict[int, list[int]] = {}
    for r, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(r)
    for length, rows in by_length.items():
        per_call = max(1, _TOKEN_BUDGET // min(length, piece))
        for start in range(0, len(rows), per_call):
            sub = rows[start:start + per_call]
            idx = torch.tensor(sub, dtype=torch.long, device=device)
            ids = torch.tensor([prompts[r] for r in sub], dtype=torch.long, device=device)
            st = None if state is None else tree_map(lambda t: t.index_select(0, idx), state)
            for a in range(0, length, piece):
                hidden, st = model.hidden_states(ids[:, a:a + piece], st)
            logits = model.logits(hidden[:, -1])            # the last position's only
            last = logits if logits.dtype == torch.float64 else logits.float()
            if out_state is None:
                out_logits = last.new_empty(B, last.shape[-1])
                out_state = tree_map(lambda t: t.new_empty(B, *t.shape[1:]), st)
            out_logits.index_copy_(0, idx, last)
            tree_map(lambda d, s: d.index_copy_(0, idx, s), out_state, st)
    return out_state, out_logits


class _Chooser:
    """The token choice with its device-side inputs (keys, step counter, seen-token mask)."""

    def __init__(self, params: SamplingParams, keys: torch.Tensor, seen: torch.Tensor | None, device):
        self.params = params
        self.keys = keys.to(device)
        self.seen = seen
        self.step = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        nxt = choose(logits, self.params, keys=self.keys, step=self.step, seen=self.seen)
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        self.step.add_(1)
        return nxt


def _run_steps(model, tok, state, chooser: _Chooser, n: int, out: torch.Tensor):
    """n decode steps from token ``tok`` (B, 1); tokens written to out[:, :n]. Returns (tok, state).
    Greedy without a repetition penalty on a fused step: the step writes its argmax into out itself."""
    greedy = chooser.params.greedy and not chooser.params.uses_history and hasattr(model, "greedy_step")
    for j in range(n):
        if greedy:
            state = model.greedy_step(tok, state, out[:, j])
            tok = out[:, j:j + 1]
            continue
        logits, state = model(tok, state)
        nxt = chooser(logits[:, -1])
        out[:, j] = nxt
        tok = nxt[:, None]
    return tok, state


class _EagerDecoder:
    def __init__(self, model, tok, state, chooser):
        self.model, self.tok, self.state, self.chooser = model, tok, state, chooser
        self.out = torch.empty(tok.shape[0], 1, dtype=torch.long, device=tok.device)

    def __call__(self) -> torch.Tensor:
        with torch.inference_mode():
            self.tok, self.state = _run_steps(self.model, self.tok, self.state, self.chooser, 1, self.out)
            return self.out.cpu()


class _GraphDecoder:
    """Decode steps replayed from CUDA graphs over static buffers (token, state, step counter).

    One eager warm-up step (compiles and autotunes the kernels; its token is real), then a graph of
    ``steps`` steps replayed as often as needed, and a graph of the remainder so no step is wasted.
    The state is copied back into the static buffers once per replay, not once per step. Replays
    are pipelined: replay i+1 is queued before the tokens of replay i are read, so the GPU never
    waits for the host.
    """

    def __init__(self, model, tok, state, chooser, steps: int, total: int):
        self.model, self.chooser = model, chooser
        self.tok = tok.clone()
        self.state = state                   # owned: prefill made it, nobody else holds it
        B = tok.shape[0]
        self.out = torch.empty(B, steps, dtype=torch.long, device=tok.device)
        self.host = [_pinned((B, steps)) for _ in range(2)]
        self.events = [_event() for _ in range(2)]
        with torch.inference_mode():
            _run_on_side_stream(lambda: self._body(1))
            self.ready = [self.out[:, :1].cpu()]
            left = total - 1
            self.plan = [steps] * (left // steps) + ([left % steps] if left % steps else [])
            self.replays: dict[int, object] = {}
            pool = None
            for n in sorted(set(self.plan), reverse=True):
                self.replays[n], pool = _capture(lambda n=n: self._body(n), pool)
        self.pending: list[tuple[int, int]] = []      # (slot, steps) of queued replays, oldest first
        self.next_slot = 0

    def _body(self, n: int) -> None:
        tok, st = _run_steps(self.model, self.tok, self.state, self.chooser, n, self.out)
        tree_map(lambda d, s: d.copy_(s), self.state, st)
        self.tok.copy_(tok)

    def _launch(self) -> None:
        n = self.plan.pop(0)
        slot = self.next_slot
        self.next_slot = 1 - slot
        self.replays[n]()
        self.host[slot].copy_(self.out, non_blocking=True)
        self.events[slot].record()
        self.pending.append((slot, n))

    def close(self) -> None:
        """Wait for queued replays (an early stop), so no buffer is released under a running graph."""
        for slot, _ in self.pending:
            self.events[slot].synchronize()
        self.pending.clear()

    def __call__(self) -> torch.Tensor:
        if self.ready:
            return self.ready.pop()
        while len(self.pending) < 2 and self.plan:
            self._launch()
        slot, n = self.pending.pop(0)
        self.events[slot].synchronize()
        block = self.host[slot][:, :n].clone()
        if self.plan:
            self._launch()                   # keep the GPU busy while the caller reads this block
        return block


# --- the CUDA specifics, one line each (a CPU test swaps them for eager stand-ins) -------------------

def _graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def _pinned(shape) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.long).pin_memory()


def _event():
    return torch.cuda.Event()


def _run_on_side_stream(fn) -> None:
    """Warm-up on a side stream, as CUDA graph capture wants."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


def _capture(fn, pool=None):
    """Capture fn in a CUDA graph (sharing ``pool``): returns (replay, pool)."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        fn()
    return g.replay, g.pool()


def default_steps_per_graph(batch_size: int) -> int:
    """Steps per graph replay: the state copy per replay costs 2 x state bytes, so larger batches
    (larger states) amortise it over more steps; tokens then arrive in blocks of this many."""
    return max(4, min(32, 1 << (batch_size - 1).bit_length()))


def decode_steps(model, state: list, last_logits: torch.Tensor, params: SamplingParams,
                 keys: torch.Tensor, max_new_tokens: int, *, seen: torch.Tensor | None = None,
                 cuda_graph: bool | None = None, steps_per_graph: int | None = None,
                 compile: bool = False, fused: bool | None = None, stats: GenerationStats | None = None):
    """Yield the new tokens as CPU (B, k) blocks, k >= 1, exactly max_new_tokens per row in all.
    Stop iterating to stop early. ``state`` is consumed (the decoder updates it in place).
    ``compile``: run the decode step through ``torch.compile`` (compiled in the first step; on
    CUDA the compiled step is then captured in the graph like the eager one); with the fused step,
    it compiles the fused step's pieces (which are compiled on CUDA anyway).
    ``cuda_graph`` (default: on CUDA, for an XLSTMLarge) needs an XLSTMLarge: the original stack
    (XLSTMStackLM) decodes eagerly.
    ``fused`` (default: on CUDA, for an XLSTMLarge): decode through ``fused.FusedStep`` (concatenated
    projections, fused elementwise work; same results to the dtype's rounding), built here and
    freed when the decoding ends; False runs ``model(token, state)`` itself."""
    device = last_logits.device
    if cuda_graph and not supports_cuda_graph(model):
        raise ValueError(f"cuda_graph=True needs an XLSTMLarge; a {type(model).__name__} decodes eagerly "
                         "(pass cuda_graph=None or False)")
    if fused is None:
        fused = device.type == "cuda" and supports_cuda_graph(model)
    elif fused and not supports_cuda_graph(model):
        raise ValueError(f"fused=True needs an XLSTMLarge, got a {type(model).__name__} (pass fused=None or False)")
    B = last_logits.shape[0]
    chooser = _Chooser(params, keys, seen, device)
    with torch.inference_mode():
        first = chooser(last_logits)
    yield first[:, None].cpu()
    remaining = max_new_tokens - 1
    if remaining <= 0:
        return
    if cuda_graph is None:
        cuda_graph = _graphs_supported(device) and supports_cuda_graph(model)
    if cuda_graph and not _graphs_supported(device):
        raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {device}")
    if fused:                                # built only now: a one-token generation needs no step
        # the decoders own the state (it is consumed), so the step kernels may update it in place
        model = FusedStep(getattr(model, "_orig_mod", model), compile=True if compile else None,
                          inplace_state=True)
    elif compile:
        model = torch.compile(model, dynamic=False)
    tok = first[:, None]
    t0 = time.perf_counter()
    if cuda_graph:
        steps = steps_per_graph if steps_per_graph is not None else default_steps_per_graph(B)
        decoder = _GraphDecoder(model, tok, state, chooser, max(1, min(steps, remaining)), remaining)
        warm = decoder()
        if stats is not None:
            stats.capture_s = time.perf_counter() - t0
        yield warm
        remaining -= warm.shape[1]
    else:
        decoder = _EagerDecoder(model, tok, state, chooser)
    del state
    t1 = time.perf_counter()
    done = 0
    try:
        while remaining > 0:
            block = decoder()
            remaining -= block.shape[1]
            done += block.shape[1]
            if stats is not None:
                stats.decode_steps, stats.decode_s = done, time.perf_counter() - t1
            yield block
    finally:
        if cuda_graph:
            decoder.close()
