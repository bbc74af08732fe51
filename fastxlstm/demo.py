"""A one-minute tour: build a small xLSTM-Large, run it, decode a few tokens, save and reload it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoint import load, save
from .config import PRESETS
from .model import XLSTMLarge


def demo(out: str | Path = "out/demo") -> dict:
    """Build the "tiny" preset, run a batch, continue it token by token, save, reload, compare."""
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = XLSTMLarge(cfg).eval()
    print(f"built {model.num_params():,}-parameter xLSTM-Large (E={cfg.embedding_dim}, "
          f"{cfg.num_blocks} blocks, {cfg.num_heads} heads, backend {model.backend_for(torch.device('cpu')).value})")
    ids = torch.randint(0, cfg.vocab_size, (4, 256))
    with torch.no_grad():
        t0 = time.perf_counter()
        logits, state = model(ids)
        dt = time.perf_counter() - t0
        print(f"forward of {ids.shape[0]}x{ids.shape[1]} tokens: {dt * 1e3:.1f} ms, "
              f"logits {tuple(logits.shape)}, state {sum(s.c.numel() + s.n.numel() + s.m.numel() for s in state):,} floats")
        step_logits, _ = model(ids[:, :1], state)
        print(f"one decode step from the state: logits {tuple(step_logits.shape)}")
    path = save(model, out)
    reloaded = load(path)
    with torch.no_grad():
        same = torch.equal(reloaded(ids)[0], logits)
    print(f"saved to {path}/ and reloaded: logits bit-identical = {same}")
    if not same:
        raise RuntimeError("reloaded model differs from the saved one")
    return {"params": model.num_params(), "forward_ms": dt * 1e3, "path": str(path)}
