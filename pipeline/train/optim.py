"""AdamW parameter groups and the learning-rate schedule as a pure function of the step."""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import OptimConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, scalar scales (logit scale/bias), embeddings and position/class tokens skip weight decay."""
    return (param.ndim < 2 or "bias" in name or "ln_" in name or "norm" in name or "logit_" in name
            or "embedding" in name or name.endswith("class_embedding"))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (keep if no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cfg.fused or None)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr at `step`: linear warm-up, then cosine to min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    return cfg.lr * lr_factor(step, cfg, total_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's LR from the pure schedule. No LR scheduler object: Accelerate's prepared scheduler
    steps once per process per step (split_batches=False), so with N processes the schedule would run N x fast."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def schedule_signature(cfg: OptimConfig, total_steps: int) -> dict:
    """What a resumed run must share with the run it continues, or its LR would jump."""
    return {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "schedule": cfg.schedule,
            "min_lr_ratio": cfg.min_lr_ratio, "total_steps": total_steps}


def check_schedule(saved: dict, current: dict, checkpoint: str) -> None:
    """Refuses to resume under a different schedule (open_clip recomputes it and the LR silently jumps)."""
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"cannot resume {checkpoint}: the LR schedule changed ({what}); the LR would jump. "
                         "Resume with the run's own optim.* and train.steps, or start a new run_dir")
