"""Resuming on another number of processes: the global batch is the invariant.

A checkpoint fixes the global batch G = data.batch_size x train.accum_steps x processes, the LR schedule and
the step count. Resumed on M processes, the micro-batch (data.batch_size, what fits a device's memory) stays and
the accumulation steps become G / (data.batch_size x M); a world size for which that is not a whole number is
refused, naming the ones that keep G. The data order continues through the loader's segments
(pipeline/data/loader.py `load_elastic`), the model and optimizer state load whole on any world size
(checkpoint.py), and each process's RNG streams are derived afresh from (train.seed, step, rank).
"""
from __future__ import annotations

import dataclasses
import tomllib

from pipeline.config import Config


def saved_global_batch(trainer: dict) -> int:
    """The global batch of a checkpoint's trainer.pt (from its resolved config where it predates the key)."""
    if "global_batch" in trainer:
        return int(trainer["global_batch"])
    cfg = tomllib.loads(trainer.get("config", "") or "")
    batch = cfg.get("data", {}).get("batch_size", 256)
    accum = cfg.get("train", {}).get("accum_steps", 1)
    return int(batch) * int(accum) * int(trainer["world_size"])


def world_sizes_for(global_batch: int, batch_size: int) -> list[int]:
    """The process counts that keep `global_batch` with micro-batches of `batch_size`."""
    if global_batch % batch_size:
        return []
    per_micro = global_batch // batch_size
    return [m for m in range(1, per_micro + 1) if per_micro % m == 0]


def keep_global_batch(cfg: Config, trainer: dict, world_size: int) -> tuple[Config, str | None]:
    """`cfg` with the accumulation steps that keep the checkpoint's global batch on `world_size` processes,
    and a note saying what changed (None: nothing did); ValueError naming the world sizes that would work."""
    saved_world = int(trainer["world_size"])
    if saved_world == world_size:
        return cfg, None
    global_batch, batch = saved_global_batch(trainer), cfg.data.batch_size
    accum, left = divmod(global_batch, batch * world_size)
    if left or accum < 1:
        valid = world_sizes_for(global_batch, batch)
        raise ValueError(f"cannot resume on {world_size} processes: the checkpoint's global batch {global_batch} "
                         f"({saved_world} processes) is not data.batch_size {batch} x accum_steps x {world_size}; "
                         f"processes that keep it: {', '.join(map(str, valid)) or 'none (change data.batch_size)'}")
    note = (f"resuming on {world_size} processes (the checkpoint ran on {saved_world}): global batch {global_batch} "
            f"kept with data.batch_size {batch} x train.accum_steps {accum}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, accum_steps=accum)), note
