"""The process group of a training run: which rank this process is, and joining / leaving torchrun's group."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    cpu_group: Any = field(default=None, repr=False, compare=False)  # gloo group for host-side flags (NCCL runs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment variables (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world)
    cpu_group = torch_dist.new_group(backend="gloo") if torch_dist.get_backend() == "nccl" else None
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, cpu_group=cpu_group)


def agree(flag: bool, dist: DistInfo) -> bool:
    """True on every rank if ``flag`` is True on any rank. Reduces a CPU tensor (over gloo, beside NCCL), so
    it never waits for the GPU; a no-op for one process."""
    if not dist.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch_dist.all_reduce(t, group=dist.cpu_group)
    return bool(t.item() > 0)


def cleanup_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
