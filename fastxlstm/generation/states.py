"""Recurrent states as values: select and fork rows, join batches, save to and load from disk.

A model state is ``list[MLSTMState]``, one per block, each with c (B, H, Dqk, Dv), n (B, H, Dqk),
m (B, H) in float32. Its size is fixed by the model: it does not grow with the tokens consumed, so
caching a prompt costs the same whether the prompt had ten tokens or a million.
"""

from __future__ import annotations

import json
import os

import torch

from ..ops import MLSTMState

__all__ = ["select_rows", "fork", "concat", "save_state", "load_state", "state_nbytes"]

_FORMAT = "fastxlstm-state/1"


def select_rows(state: list[MLSTMState], rows) -> list[MLSTMState]:
    """The state of the given batch rows (a new state; the input is untouched)."""
    _check(state)
    device = state[0].c.device
    idx = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(list(rows), dtype=torch.long)
    idx = idx.to(device=device, dtype=torch.long)
    B = state[0].c.shape[0]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= B):
        raise ValueError(f"rows must lie in [0, {B}), got {idx.tolist()}")
    return [MLSTMState(*(t.index_select(0, idx) for t in s)) for s in state]


def fork(state: list[MLSTMState], n: int) -> list[MLSTMState]:
    """Each row repeated n times in a row: row r's copies are rows r*n .. r*n+n-1. Copies are
    independent tensors, so the continuations never affect each other or the original."""
    _check(state)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return [MLSTMState(*(t.repeat_interleave(n, dim=0) for t in s)) for s in state]


def concat(states: list[list[MLSTMState]]) -> list[MLSTMState]:
    """Join the batches of several states (of the same model) into one."""
    if not states:
        raise ValueError("concat needs at least one state")
    for s in states:
        _check(s)
    if len({len(s) for s in states}) != 1:
        raise ValueError(f"states have different numbers of blocks: {[len(s) for s in states]}")
    return [MLSTMState(*(torch.cat(parts, dim=0) for parts in zip(*blocks))) for blocks in zip(*states)]


def state_nbytes(state: list[MLSTMState]) -> int:
    return sum(t.numel() * t.element_size() for s in state for t in s)


def save_state(path: str | os.PathLike, state: list[MLSTMState], *, metadata: dict | None = None,
               **tensors: torch.Tensor) -> None:
    """Write a state (and optional extra tensors, e.g. ``logits=``) to one safetensors file.

    ``metadata`` is a JSON-serialisable dict stored alongside (e.g. the prompt's token ids).
    """
    from safetensors.torch import save_file

    _check(state)
    out = {}
    for b, s in enumerate(state):
        for name, t in zip(MLSTMState._fields, s):
            out[f"blocks.{b}.{name}"] = t.detach().contiguous().cpu()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"extra tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
        out[f"extra.{name}"] = t.detach().contiguous().cpu()
    meta = {"format": _FORMAT, "num_blocks": str(len(state)), "metadata": json.dumps(metadata or {})}
    save_file(out, os.fspath(path), metadata=meta)


def load_state(path: str | os.PathLike, *, device=None, model=None
               ) -> tuple[list[MLSTMState], dict[str, torch.Tensor], dict]:
    """Read what ``save_state`` wrote: (state, extra tensors, metadata dict).

    With ``model`` given, the state is checked against its shapes (a state of another config is
    an error, never a silent misfit) and placed on the model's device unless ``device`` is set.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no state file at {path}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a fastxlstm state file (format {meta.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    n = int(meta["num_blocks"])
    if model is not None and device is None:
        device = next(model.parameters()).device
    state = [MLSTMState(*(tensors[f"blocks.{b}.{name}"].to(device) for name in MLSTMState._fields))
             for b in range(n)]
    extra = {k[len("extra."):]: t.to(device) for k, t in tensors.items() if k.startswith("extra.")}
    if model is not None:
        check_state(model, state)
    return state, extra, json.loads(meta.get("metadata", "{}"))


def check_state(model, state: list[MLSTMState], batch: int | None = None) -> None:
    """Raise ValueError when ``state`` does not fit ``model`` (and ``batch`` rows, if given)."""
    _check(state)
    c = model.cfg
    if len(state) != c.num_blocks:
        raise ValueError(f"the state has {len(state)} blocks, the model {c.num_blocks}: "
                         "was it made by another model?")
    B = state[0].c.shape[0] if batch is None else batch
    expected = {"c": (B, c.num_heads, c.qk_head_dim, c.v_head_dim), "n": (B, c.num_heads, c.qk_head_dim),
                "m": (B, c.num_heads)}
    for b, s in enumerate(state):
        for name, shape in expected.items():
            got = tuple(getattr(s, name).shape)
            if got != shape:
                raise ValueError(f"state block {b}: {name} has shape {got}, expected {shape} "
                                 f"(batch {B}) for this model")


def _check(state) -> None:
    if not isinstance(state, (list, tuple)) or not state or not all(isinstance(s, MLSTMState) for s in state):
        raise TypeError("a state must be a non-empty list of MLSTMState (what model(...) returns)")
