"""mLSTM implementations. Each backend module exposes ``mlstm`` and ``mlstm_step`` with the
signatures of ``reference``; registering a backend is one line in IMPLS (tests pick it up)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from types import ModuleType

from .. import Backend

IMPLS: dict[Backend, str] = {
    Backend.REFERENCE: "reference",
    Backend.NATIVE: "native",
    Backend.TRITON: "triton",
}


@functools.cache
def available() -> list[Backend]:
    """Backends whose module is part of this installation (Triton may still fail to import).
    Cached: the installation does not change in a process, and ops call this on every launch."""
    return [b for b, name in IMPLS.items() if importlib.util.find_spec(f"{__name__}.{name}") is not None]


def triton_takes_chunk(chunk_size: int) -> bool:
    """Whether the Triton kernels run this chunk size: a power of two >= 16 (their tile sizes)."""
    return chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0


def get(backend: Backend) -> ModuleType:
    """Import a backend module lazily, so ``import fastxlstm`` never imports Triton. Once imported
    (ops.resolve_backend does it outside compiled code) it is read from sys.modules, which Dynamo
    traces; an import inside compiled code would break its graph."""
    if backend not in IMPLS:
        raise ValueError(f"backend {backend!r} has no mLSTM implementation; choose from {list(IMPLS)}")
    name = f"{__name__}.{IMPLS[backend]}"
    module = sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)
