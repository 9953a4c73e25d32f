"""Distributed setup: the only module that reads the torchrun environment.

`torchrun --nproc_per_node=N train.py ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without them
the run is a single process (rank 0 of 1) and no process group is created. NCCL joins GPUs,
gloo joins CPU processes. Every other module asks a `DistEnv` instead of the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tinyllama.device import pick_device


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among world_size processes and its device.

    With tensor parallelism (tp > 1) the processes form a (data, tensor) mesh of
    (world_size / tp) x tp, rank = dp_rank * tp + tp_rank: the tp processes of a row split
    each matrix and read the same batches, so data (loaders, evaluation windows) is dealt by
    dp_rank among dp_size."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int = 1

    @property
    def dp_size(self) -> int:
        """Processes that read different data (the data-parallel degree)."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, prints progress and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_gather_object(self, obj: Any) -> List[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (e.g. per-rank RNG and loader states)."""
        if not self.is_distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (so all ranks stop at the same step)."""
        if not self.is_distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` (a tensor on this rank's device) over all ranks, on every rank."""
        if not self.is_distributed:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (e.g. the temporary folder a sharded save writes into)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def torchrun_world_size() -> int:
    """How many processes torchrun launched (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed(requested_device: str = "auto", tp: int = 1) -> DistEnv:
    """Read the torchrun environment, pick the device, and join the process group if launched
    with more than one process. `tp`: the tensor-parallel degree (it must divide the world
    size: tinyllama.train.parallel checks that first). Call `teardown_distributed()` at the end."""
    rank = int(os.environ.get("RANK", 0))
    world_size = torchrun_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, tp=tp)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """DistributedDataParallel around `model` when there are several processes, else `model`.

    Gradients are averaged across ranks during backward; the loop skips that all-reduce on all
    but the last micro-step of an accumulation with `model.no_sync()`.
    """
    if not env.is_distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
