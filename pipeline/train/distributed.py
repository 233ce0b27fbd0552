"""The process topology as a plain value, and the few collectives the loop needs.

Model code never imports this module: wrapping and gathers are applied from the outside.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process sits: `rank` of `world_size`, on node `node_rank` of `num_nodes`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    num_nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(1, self.world_size // self.num_nodes)

    @classmethod
    def from_accelerator(cls, accelerator) -> "World":
        state = accelerator.state
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        return cls(rank=state.process_index, world_size=state.num_processes,
                   local_rank=state.local_process_index,
                   num_nodes=max(1, state.num_processes // max(1, local_world)))


def print0(world: World, *args, **kwargs) -> None:
    """print on rank 0 only."""
    if world.is_main:
        print(*args, **kwargs, flush=True)


def all_reduce_max(value: float | int, device: torch.device) -> float:
    """The maximum of a scalar over all ranks (used so that every rank agrees on stopping)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
