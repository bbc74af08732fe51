"""Model checkpoints: ``save(model, dir)`` and ``load(dir)``.

Our format: ``config.json`` ({"fastxlstm_format_version", "architecture", "config"}) beside
``model.safetensors``. ``load`` also reads a Hugging Face xLSTM directory as the published
xLSTM-7B is laid out (config.json with model_type "xlstm"; one model.safetensors or shards listed
in model.safetensors.index.json; float32 or bf16). The model is built on the meta device and every
shard is assigned straight into it, so a 7B load never holds two copies of the weights.
Files are written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import ModelConfig
from .model import XLSTMLarge
from .stack import StackConfig, XLSTMStackLM

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"

# model classes by architecture name; other model families register here
ARCHITECTURES: dict[str, tuple[type, type]] = {
    "xlstm_large": (ModelConfig, XLSTMLarge),
    "xlstm_stack": (StackConfig, XLSTMStackLM),
}

# Hugging Face / published xLSTM-7B key -> our key (the one rename the published layout has)
HF_KEY_RENAMES = {"backbone.embeddings.weight": "embedding.weight"}


def save(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` (weights + config) to ``directory``, atomically file by file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = _architecture_of(model)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and getattr(model.cfg, "tie_word_embeddings", False):
            continue                               # tied: stored once, as the embedding
        tensors[name] = t.detach().to("cpu").contiguous()
    _atomic_write(directory / WEIGHTS, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    config = {"fastxlstm_format_version": FORMAT_VERSION, "architecture": arch, "config": model.cfg.to_dict()}
    _atomic_write(directory / CONFIG, lambda path: Path(path).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def load(directory: str | os.PathLike, *, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None, progress: bool | None = None, **config_overrides) -> torch.nn.Module:
    """Load a model saved by ``save`` or a Hugging Face xLSTM directory.

    Args:
        directory: the model directory.
        device: where the weights go (default CPU; "meta" reads the config only).
        dtype: cast floating weights to this dtype (default: as stored).
        progress: show a progress bar over the weight files (default: only on a terminal and when
            the checkpoint is sharded).
        config_overrides: ModelConfig fields to replace, e.g. backend="native" or chunk_size=128.
    Raises:
        FileNotFoundError for a missing directory or file; ValueError naming the key, file or field
        for a config or weights that do not fit.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    raw = _read_json(directory / CONFIG)
    if "fastxlstm_format_version" in raw:
        cfg_cls, model_cls, cfg = _our_config(raw, directory)
        renames = {}
    elif raw.get("model_type") == "xlstm":
        cfg_cls, model_cls = ARCHITECTURES["xlstm_large"]
        cfg, renames = config_from_hf(raw), HF_KEY_RENAMES
    else:
        raise ValueError(f"{directory / CONFIG}: neither a fastxlstm config nor a Hugging Face xLSTM config "
                         f"(model_type is {raw.get('model_type')!r})")
    if config_overrides:
        cfg = cfg_cls.from_dict({**cfg.to_dict(), **config_overrides})
    with torch.device("meta"):
        model = model_cls(cfg)
    if device is not None and torch.device(device).type == "meta":
        return model
    files = _weight_files(directory)
    show = progress if progress is not None else (len(files) > 1 and sys.stderr.isatty())
    files_iter = tqdm(files, desc=f"loading {directory.name}", unit="shard", disable=not show)
    _assign_weights(model, files_iter, renames, device=torch.device(device or "cpu"), dtype=dtype)
    return model


def describe(directory: str | os.PathLike) -> dict:
    """What a model directory holds, without reading the weights: its layout ("fastxlstm" or
    "hugging face"), the model class and config, the parameter counts, and the weight files with
    their tensors' dtypes and total size (a file that is missing or not safetensors is an error)."""
    directory = Path(directory)
    model = load(directory, device="meta")
    raw = _read_json(directory / CONFIG)
    files = _weight_files(directory)
    dtypes: set[str] = set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                dtypes.update(str(f.get_slice(k).get_dtype()) for k in f.keys())
        except SafetensorError as e:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    n = model.num_params()
    n_emb = model.embedding.weight.numel()                 # both architectures have one
    return {"layout": "fastxlstm" if "fastxlstm_format_version" in raw else "hugging face",
            "model": type(model).__name__, "config": model.cfg, "parameters": n,
            "non_embedding_parameters": n - n_emb, "files": [p.name for p in files],
            "bytes": sum(p.stat().st_size for p in files), "dtypes": sorted(dtypes),
            "tokenizer": "tokenizer.json" if (directory / "tokenizer.json").is_file() else None}


def config_from_hf(raw: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face xLSTM config.json (the published xLSTM-7B's included).

    Fields that describe the architecture are mapped; runtime-only fields (kernel names, cache and
    dtype flags) are ignored; an architecture option we do not implement raises.
    """
    def pick(*names, default=None):
        for n in names:
            if n in raw and raw[n] is not None:
                return raw[n]
        return default

    if pick("weight_mode", default="single") != "single":
        raise ValueError(f"config.json: weight_mode {raw['weight_mode']!r} is not supported (only 'single')")
    for flag in ("add_qk_norm", "add_post_norm", "add_embedding_dropout"):
        if raw.get(flag):
            raise ValueError(f"config.json: {flag}=true is not part of the xLSTM-Large architecture we implement")
    fields = dict(
        vocab_size=pick("vocab_size"), embedding_dim=pick("embedding_dim", "hidden_size"),
        num_heads=pick("num_heads"), num_blocks=pick("num_blocks", "num_hidden_layers"),
        qk_dim_factor=pick("qk_dim_factor", default=0.5), v_dim_factor=pick("v_dim_factor", default=1.0),
        ffn_proj_factor=pick("ffn_proj_factor", default=2.667),
        ffn_round_up_to_multiple_of=pick("ffn_round_up_to_multiple_of", default=64),
        gate_soft_cap=pick("gate_soft_cap", default=15.0),
        output_logit_soft_cap=pick("output_logit_soft_cap", default=30.0),
        norm_eps=pick("norm_eps", default=1e-6),
        norm_reduction_force_float32=pick("norm_reduction_force_float32", default=True),
        cell_eps=pick("eps", default=1e-6), use_bias=pick("use_bias", default=False),
        add_out_norm=pick("add_out_norm", default=True),
        tie_word_embeddings=pick("tie_word_embeddings", default=False),
        chunk_size=pick("chunk_size", default=64),
        bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )
    missing = [k for k in ("vocab_size", "embedding_dim", "num_heads", "num_blocks") if fields[k] is None]
    if missing:
        raise ValueError(f"config.json: missing required field(s) {', '.join(missing)}")
    cfg = ModelConfig(**fields)
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim != cfg.v_head_dim:
        raise ValueError(f"config.json: head_dim {head_dim} does not match embedding_dim * v_dim_factor / "
                         f"num_heads = {cfg.v_head_dim}")
    multiple = raw.get("mlstm_round_up_to_multiple_of")
    if multiple:
        for name, dim in (("qk", cfg.qk_dim), ("v", cfg.v_dim)):
            if dim % multiple:
                raise ValueError(f"config.json: {name} width {dim} is not a multiple of "
                                 f"mlstm_round_up_to_multiple_of={multiple}; this layout is not supported")
    return cfg


# --- helpers -------------------------------------------------------------------------------------

def _architecture_of(model) -> str:
    for name, (_, model_cls) in ARCHITECTURES.items():
        if type(model) is model_cls:
            return name
    raise TypeError(f"cannot save a {type(model).__name__}: not a registered fastxlstm architecture")


def _our_config(raw: dict, directory: Path):
    version = raw["fastxlstm_format_version"]
    if version != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG}: format version {version} is not supported (expected {FORMAT_VERSION})")
    arch = raw.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{directory / CONFIG}: unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    cfg_cls, model_cls = ARCHITECTURES[arch]
    try:
        cfg = cfg_cls.from_dict(raw["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{directory / CONFIG}: invalid config: {e}") from None
    return cfg_cls, model_cls, cfg


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX).is_file():
        weight_map = _read_json(directory / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{directory / INDEX} has no weight_map")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = [directory / WEIGHTS]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weights file {f} not found")
    return files


def _assign_weights(model: torch.nn.Module, files, renames: dict[str, str], *,
                    device: torch.device, dtype: torch.dtype | None) -> None:
    """Read each file's tensors straight into the meta-built model; check names and shapes."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    if tied:
        expected.pop("lm_head.weight", None)
    loaded: set[str] = set()
    for path in files:
        part = {}
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    name = renames.get(key, key)
                    if name not in expected:
                        raise ValueError(f"{path.name}: unexpected key {key!r} (not a parameter of this model)")
                    if name in loaded or name in part:
                        raise ValueError(f"{path.name}: key {key!r} appears twice in the checkpoint")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[name]:
                        raise ValueError(f"{path.name}: key {key!r} has shape {shape}, the config expects "
                                         f"{expected[name]}")
                    t = f.get_tensor(key)
                    part[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except SafetensorError as e:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        model.load_state_dict(part, strict=False, assign=True)
        loaded.update(part)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} key(s): {shown}")
    if tied:
        model.lm_head.weight = model.embedding.weight
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        raise ValueError(f"checkpoint mixes parameter dtypes {sorted(map(str, dtypes))}; pass dtype= to load")


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())              # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
