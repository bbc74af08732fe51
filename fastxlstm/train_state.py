"""Resumable training checkpoints on disk: their layout, atomic writing, and checking on resume.

    OUT/checkpoints/step_0000400/
        model.safetensors, config.json   the weights, as fastxlstm.save writes them (fastxlstm.load reads them)
        trainer.pt                       optimizer, scheduler, step, RNG states, data position
        train_config.json                the TrainConfig of the run (what --resume continues)
        carry_rank<R>.pt                 each rank's carried recurrent state (stateful runs only)
        manifest.json                    size and SHA-256 of every file above; written last

A checkpoint is written into ``.tmp-step_N`` and renamed when complete, so a crash never leaves a
half-written ``step_N``; a truncated or altered file is reported by name on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.pt"
TRAIN_CONFIG = "train_config.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def staging_dir(root: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (rank 0); leftovers of a crash
    while saving are removed."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step_{step:07d}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, step: int, keep_last: int) -> Path:
    """Write the manifest, rename ``tmp`` to ``step_N`` and delete all but the newest ``keep_last``."""
    root = tmp.parent
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    _fsync_dir(tmp)
    final = root / f"step_{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out: str | os.PathLike, resume: str) -> Path:
    """The checkpoint ``resume`` names: a directory, or 'latest' for the newest under OUT/checkpoints."""
    if resume != "latest":
        path = Path(resume)
        if not (path / MANIFEST).is_file() and not path.is_dir():
            raise FileNotFoundError(f"resume: checkpoint {path} does not exist")
        return path
    root = Path(out) / CKPT_DIR
    steps = sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)))
    if not steps:
        raise FileNotFoundError(f"resume: no checkpoint in {root} (start without --resume, or pass --out of the run)")
    return steps[-1][1]


def verify_checkpoint(path: Path, *, hashes: bool = True) -> None:
    """Raise naming the checkpoint and the file when anything in it is missing, truncated or (with
    ``hashes``, by its SHA-256 sum) altered."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise RuntimeError(f"checkpoint {path} is incomplete or corrupt: {MANIFEST} is missing")
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict) or not all(
                isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
                for m in files.values()):
            raise ValueError("its 'files' must map names to their bytes and sha256")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise RuntimeError(f"checkpoint {path} is corrupt: {MANIFEST} is unreadable ({e})") from None
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise RuntimeError(f"checkpoint {path} is incomplete: {name} is missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise RuntimeError(f"checkpoint {path} is corrupt: {name} has {size} bytes, {meta['bytes']} were "
                               f"written (truncated?)")
        if hashes and _sha256(f) != meta["sha256"]:
            raise RuntimeError(f"checkpoint {path} is corrupt: {name} does not match its SHA-256 sum")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
