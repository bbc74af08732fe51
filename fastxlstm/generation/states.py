"""Recurrent states as values: select and fork rows, join batches, save to and load from disk.

A model state is a list with one entry per block: for an XLSTMLarge, one ``MLSTMState`` per block
(c (B, H, Dqk, Dv), n (B, H, Dqk), m (B, H) in float32); for the original stack (XLSTMStackLM),
one ``LayerState(conv, cell)`` per block, conv (B, K-1, C) or None and cell an MLSTMState or
SLSTMState. Every tensor is batch-first, so all operations here work leaf by leaf on the nested
NamedTuples. A state's size is fixed by the model: it does not grow with the tokens consumed, so
caching a prompt costs the same whether the prompt had ten tokens or a million.
"""

from __future__ import annotations

import json
import os
import weakref

import torch

from ..layers.common import LayerState
from ..ops import MLSTMState, SLSTMState

__all__ = ["select_rows", "fork", "concat", "save_state", "load_state", "state_nbytes"]

_FORMAT = "fastxlstm-state/1"
# NamedTuple types a state may hold, by name (the structure stored in a state file names them)
_TYPES = {t.__name__: t for t in (MLSTMState, SLSTMState, LayerState)}


# --- the nested structure -------------------------------------------------------------------------

def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def tree_map(fn, *trees):
    """Apply ``fn`` to the tensors at the same place in each tree (lists and NamedTuples of
    tensors); None stays None. The result has the structure of the first tree."""
    t = trees[0]
    if isinstance(t, torch.Tensor):
        return fn(*trees)
    if t is None:
        return None
    if _is_namedtuple(t):
        return type(t)(*(tree_map(fn, *parts) for parts in zip(*trees)))
    if isinstance(t, (list, tuple)):
        return type(t)(tree_map(fn, *parts) for parts in zip(*trees))
    raise TypeError(f"a state holds tensors, NamedTuples, lists and None, not {type(t).__name__}")


def named_tensors(x, prefix: str = "") -> list[tuple[str, torch.Tensor | None]]:
    """Flatten to (dotted name, tensor or None) pairs: "3.c" for an MLSTMState block, "3.cell.c"
    and "3.conv" for a LayerState block."""
    if isinstance(x, torch.Tensor) or x is None:
        return [(prefix, x)]
    if _is_namedtuple(x):
        items = zip(x._fields, x)
    elif isinstance(x, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(x))
    else:
        raise TypeError(f"a state holds tensors, NamedTuples, lists and None, not {type(x).__name__}")
    out = []
    for name, v in items:
        out.extend(named_tensors(v, f"{prefix}.{name}" if prefix else name))
    return out


def _leaves(state) -> list[torch.Tensor]:
    return [t for _, t in named_tensors(state) if t is not None]


def _structure(x):
    """JSON-ready description of the nesting: "tensor", None, or [type name, [fields...]]."""
    if isinstance(x, torch.Tensor):
        return "tensor"
    if x is None:
        return None
    return [type(x).__name__, [_structure(v) for v in x]]


def _build(spec, tensors: dict[str, torch.Tensor], prefix: str):
    if spec is None:
        return None
    if spec == "tensor":
        if prefix not in tensors:
            raise ValueError(f"the state file has no tensor {prefix!r}")
        return tensors[prefix]
    name, fields = spec
    if name not in _TYPES:
        raise ValueError(f"unknown state type {name!r} in the state file")
    typ = _TYPES[name]
    if len(fields) != len(typ._fields):
        raise ValueError(f"state type {name} has {len(typ._fields)} fields, the file {len(fields)}")
    return typ(*(_build(f, tensors, f"{prefix}.{n}") for f, n in zip(fields, typ._fields)))


def _batch(state) -> int:
    return _leaves(state)[0].shape[0]


# --- the operations -------------------------------------------------------------------------------

def select_rows(state, rows):
    """The state of the given batch rows (a new state; the input is untouched)."""
    _check(state)
    device = _leaves(state)[0].device
    idx = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(list(rows), dtype=torch.long)
    idx = idx.to(device=device, dtype=torch.long)
    B = _batch(state)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= B):
        raise ValueError(f"rows must lie in [0, {B}), got {idx.tolist()}")
    return tree_map(lambda t: t.index_select(0, idx), state)


def fork(state, n: int):
    """Each row repeated n times in a row: row r's copies are rows r*n .. r*n+n-1. Copies are
    independent tensors, so the continuations never affect each other or the original."""
    _check(state)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return tree_map(lambda t: t.repeat_interleave(n, dim=0), state)


def concat(states):
    """Join the batches of several states (of the same model) into one."""
    if not states:
        raise ValueError("concat needs at least one state")
    for s in states:
        _check(s)
    if len({len(s) for s in states}) != 1:
        raise ValueError(f"states have different numbers of blocks: {[len(s) for s in states]}")
    if any(_structure(s) != _structure(states[0]) for s in states):
        raise ValueError("states have different structures: were they made by different models?")
    return tree_map(lambda *parts: torch.cat(parts, dim=0), *states)


def state_nbytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in _leaves(state))


def save_state(path: str | os.PathLike, state, *, metadata: dict | None = None,
               **tensors: torch.Tensor) -> None:
    """Write a state (and optional extra tensors, e.g. ``logits=``) to one safetensors file.

    Tensors are stored as "blocks.<block>.<field path>" (e.g. "blocks.3.c" for an XLSTMLarge
    block, "blocks.3.cell.c" for a stack block); the nesting is stored in the metadata.
    ``metadata`` is a JSON-serialisable dict stored alongside (e.g. the prompt's token ids).
    """
    from safetensors.torch import save_file

    _check(state)
    out = {}
    for name, t in named_tensors(state):
        if t is not None:
            out[f"blocks.{name}"] = t.detach().contiguous().cpu()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"extra tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
        out[f"extra.{name}"] = t.detach().contiguous().cpu()
    meta = {"format": _FORMAT, "num_blocks": str(len(state)), "metadata": json.dumps(metadata or {}),
            "structure": json.dumps([_structure(s) for s in state])}
    save_file(out, os.fspath(path), metadata=meta)


def load_state(path: str | os.PathLike, *, device=None, model=None):
    """Read what ``save_state`` wrote: (state, extra tensors, metadata dict).

    With ``model`` given, the state is checked against its shapes (a state of another config is
    an error, never a silent misfit) and placed on the model's device unless ``device`` is set.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no state file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a fastxlstm state file (format {meta.get('format')!r}, "
                                 f"expected {_FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: corrupt or truncated state file ({e})") from None
    n = int(meta["num_blocks"])
    if model is not None and device is None:
        device = next(model.parameters()).device
    # files written before the stack was supported hold one MLSTMState per block and no structure
    spec = json.loads(meta["structure"]) if "structure" in meta else \
        [["MLSTMState", ["tensor"] * len(MLSTMState._fields)]] * n
    if len(spec) != n:
        raise ValueError(f"{path}: the structure lists {len(spec)} blocks, the header {n}")
    moved = {k: t.to(device) for k, t in tensors.items()}
    state = [_build(s, moved, f"blocks.{b}") for b, s in enumerate(spec)]
    extra = {k[len("extra."):]: t for k, t in moved.items() if k.startswith("extra.")}
    if model is not None:
        check_state(model, state)
    return state, extra, json.loads(meta.get("metadata", "{}"))


# --- checks ---------------------------------------------------------------------------------------

_reference_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _reference(model):
    """(structure, {name: shape without the batch dim}) of the state ``model`` produces."""
    from ..model import XLSTMLarge

    ref = _reference_cache.get(model)
    if ref is not None and ref[0] is model.cfg:
        return ref[1], ref[2]
    if isinstance(model, XLSTMLarge):
        c = model.cfg
        block = MLSTMState(torch.empty(1, c.num_heads, c.qk_head_dim, c.v_head_dim), torch.empty(1, c.num_heads,
                           c.qk_head_dim), torch.empty(1, c.num_heads))
        st = [block] * c.num_blocks
    else:                                              # the model's own state after one token
        device = next(model.parameters()).device
        with torch.inference_mode():
            _, st = model(torch.zeros(1, 1, dtype=torch.long, device=device), None)
    structure = [_structure(s) for s in st]
    shapes = {name: tuple(t.shape[1:]) for name, t in named_tensors(st) if t is not None}
    _reference_cache[model] = (model.cfg, structure, shapes)
    return structure, shapes


def check_state(model, state, batch: int | None = None) -> None:
    """Raise ValueError when ``state`` does not fit ``model`` (and ``batch`` rows, if given)."""
    _check(state)
    num_blocks = model.cfg.num_blocks
    if len(state) != num_blocks:
        raise ValueError(f"the state has {len(state)} blocks, the model {num_blocks}: "
                         "was it made by another model?")
    structure, shapes = _reference(model)
    for b, (s, ref) in enumerate(zip(state, structure)):
        if _structure(s) != ref:
            raise ValueError(f"state block {b} is {_describe(_structure(s))}, expected {_describe(ref)} "
                             "for this model: was it made by another model?")
    B = _batch(state) if batch is None else batch
    for name, t in named_tensors(state):
        if t is None:
            continue
        shape = (B, *shapes[name])
        got = tuple(t.shape)
        if got != shape:
            b, _, field = name.partition(".")
            raise ValueError(f"state block {b}: {field} has shape {got}, expected {shape} "
                             f"(batch {B}) for this model")


def _describe(spec) -> str:
    if spec is None:
        return "None"
    if spec == "tensor":
        return "a tensor"
    name, fields = spec
    return f"{name}({', '.join(_describe(f) for f in fields)})"


def _check(state) -> None:
    if (not isinstance(state, (list, tuple)) or not state or not all(_is_namedtuple(s) for s in state)
            or not _leaves(state)):
        raise TypeError("a state must be a non-empty list of MLSTMState or LayerState, one per block "
                        "(what model(...) returns)")
