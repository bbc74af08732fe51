"""torchrun environment -> process group; DDP or FSDP2 wrapping; full-state gathering for saving.

Plain torchrun is the launcher (``torchrun --nproc-per-node 8 -m fastxlstm train --parallel fsdp``),
across nodes as torchrun does it. Model code never imports this module: parallelism is applied from
outside, in torchtitan's order (activation checkpointing, then compile, then sharding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .train_config import Parallel


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (world 1 and rank 0 without torchrun)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def init(parallel: Parallel, device: str = "auto") -> DistEnv:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE, pick this rank's device and start the process
    group (NCCL on CUDA, gloo on the CPU) when the world has more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and parallel is Parallel.NONE:
        raise ValueError(f"launched with WORLD_SIZE={world} but parallel is 'none': pass --parallel ddp or fsdp")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for, but torch sees no CUDA GPU")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistEnv(rank, local_rank, world, dev)


def cleanup() -> None:
    """Leave the process group once every rank is done (a rank that leaves early can abort the others)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, parallel: Parallel, *, device: torch.device,
         param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP, or FSDP2 ``fully_shard`` on every block and then on the root.

    ``param_dtype`` (bf16 for mixed precision) is FSDP's compute dtype for the gathered parameters;
    the sharded master weights and the gradient reduction stay float32.
    """
    parallel = Parallel(parallel)
    if parallel is Parallel.NONE:
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"--parallel {parallel.value} needs torchrun (no process group is set up); "
                           f"e.g. torchrun --nproc-per-node 2 -m fastxlstm train --parallel {parallel.value}")
    if parallel is Parallel.DDP:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks_of(model):
        fully_shard(block, mp_policy=mp)
    # the root stays gathered after its forward (FSDP's default for a root, said here so it holds
    # whatever the version): the chunked training loss reads the whole lm_head.weight after it
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    if hasattr(model, "hidden_states"):          # the training loss enters here instead of forward()
        register_fsdp_forward_method(model, "hidden_states")
    return model


def stack_of(model: nn.Module) -> nn.Module:
    """The module that runs the residual blocks (``backbone`` or ``stack``) of either model family."""
    for owner in ("backbone", "stack"):
        if hasattr(model, owner):
            return getattr(model, owner)
    raise TypeError(f"{type(model).__name__} has no backbone.blocks or stack.blocks to wrap")


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The residual blocks (the units of sharding and activation checkpointing) of either model family."""
    return stack_of(model).blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so its model is itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded float state dict on the CPU with plain parameter names, on rank 0 (empty
    elsewhere under FSDP); a collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of full_state_dict: every rank passes the whole state; FSDP keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, unsharded, on the CPU (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum or max over ranks (a no-op without a process group); returns t."""
    if dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
