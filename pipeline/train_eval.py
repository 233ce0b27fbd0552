"""Evaluation during training, sharded across ranks: each rank scores its share of the held-out shards and the
counts are summed, so no rank idles in a collective (and hits the process-group timeout) while rank 0 evaluates.
The metrics themselves are pipeline/evaluate.py's."""
from __future__ import annotations

import math
from typing import Callable

import torch
import webdataset as wds
from torch import nn

from pipeline.config import EvalConfig
from pipeline.distributed import World, all_reduce_sum


def rank_shards(spec: str, world: World) -> list[str]:
    """This rank's shards of a spec: every world_size-th, starting at rank (a pure function)."""
    return wds.shardlists.expand_urls(spec)[world.rank::world.world_size]


def enabled(cfg: EvalConfig) -> bool:
    return bool(cfg.zeroshot_shards and cfg.classnames)


def evaluate_sharded(clip: nn.Module, tokenize: Callable, cfg: EvalConfig, transform: Callable,
                     device: torch.device, world: World) -> dict:
    """Zero-shot classification over all ranks' shards: {'top1', 'top5', 'num_samples'} (+ 'per_class' with
    one process: evaluate.zero_shot reports per-class accuracies, not the per-class counts a sum would need)."""
    from pipeline.evaluate import zero_shot  # imported here: training must not depend on eval's import chain

    limit = math.ceil(cfg.max_samples / world.world_size) if cfg.max_samples else 0
    if world.world_size == 1:
        return zero_shot(clip, tokenize, cfg.zeroshot_shards, cfg.classnames, cfg.templates, transform,
                         cfg.batch_size, device, limit)
    mine = rank_shards(cfg.zeroshot_shards, world)
    counts = torch.zeros(3, dtype=torch.float64)  # [top1 hits, top5 hits, samples]
    if mine:
        result = zero_shot(clip, tokenize, "::".join(mine), cfg.classnames, cfg.templates, transform,
                           cfg.batch_size, device, limit)
        n = result["num_samples"]
        counts = torch.tensor([result["top1"] * n, result["top5"] * n, n], dtype=torch.float64)
    counts = all_reduce_sum(counts.to(device)).cpu()
    total = max(counts[2].item(), 1.0)
    return {"top1": counts[0].item() / total, "top5": counts[1].item() / total, "num_samples": int(counts[2])}


def log_fields(result: dict) -> dict:
    """The scalar figures of an evaluation, named for the metrics log."""
    return {f"eval/zeroshot_{k}": v for k, v in result.items() if isinstance(v, (int, float))}
