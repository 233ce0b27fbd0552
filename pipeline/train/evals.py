"""Evaluation during and after training, sharded across ranks: every rank scores its share of the held-out
shards and the counts/features are combined (pipeline/eval/evaluate.py's `world=` mode), so no rank idles in a
collective (and runs into the process-group timeout) while rank 0 evaluates alone."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline.config import EvalConfig
from pipeline.train.distributed import World


def enabled(cfg: EvalConfig) -> bool:
    return bool((cfg.zeroshot_shards and cfg.classnames) or cfg.retrieval_shards)


def evaluate_all(clip: nn.Module, tokenize: Callable, cfg: EvalConfig, transform: Callable,
                 device: torch.device, world: World) -> dict:
    """{'zeroshot': {...}, 'retrieval': {...}} for the tasks `cfg` enables; every rank returns the same."""
    from pipeline.eval.evaluate import retrieval, zero_shot  # training must not depend on eval's import chain

    was_training = clip.training
    results = {}
    if cfg.zeroshot_shards and cfg.classnames:
        results["zeroshot"] = zero_shot(clip, tokenize, cfg.zeroshot_shards, cfg.classnames, cfg.templates,
                                        transform, cfg.batch_size, device, cfg.max_samples, world=world)
    if cfg.retrieval_shards:
        results["retrieval"] = retrieval(clip, tokenize, cfg.retrieval_shards, transform, cfg.batch_size,
                                         device, cfg.max_samples, world=world)
    clip.train(was_training)
    return results


def log_fields(results: dict) -> dict:
    """The scalar figures of an evaluation, named for the metrics log (`eval/zeroshot/top1`, ...)."""
    return {f"eval/{task}/{k}": v for task, result in results.items() for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
