"""Combines the enabled objective units, each with its weight, into `(total, losses, report)`; adds each step's
masks to the batch.

Contract with the loop: `batch = objective.augment(batch, step)`, `outputs = model(batch)`,
`total, losses, report = objective(outputs, batch, step)`; `losses` holds weighted scalar tensors, `report`
floats. Learnable parts (decoders, discriminator, logit scale/bias) live in the model, so the optimizer sees them.
Each objective is one unit in pipeline/objectives/ (see registry.py); this module only loops over them.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.train.distributed import World
from pipeline.objectives.base import Unit
from pipeline.objectives.registry import ObjectiveConfig, enabled_units


class Objective(nn.Module):
    """`total_steps` (the run's train.steps) is needed only for FLIP's final unmasked phase."""

    def __init__(self, cfg: ObjectiveConfig, world: World, total_steps: int | None = None):
        super().__init__()
        self.cfg, self.total_steps = cfg, total_steps
        self.units: dict[str, Unit] = {unit.name: unit for unit in enabled_units(cfg)}
        for unit in self.units.values():
            unit.bind(world, total_steps)

    def augment(self, batch: dict, step: int) -> dict:
        """The batch plus this step's masks, ramps and turns from every unit (a new dict; the same batch when no
        unit adds anything)."""
        extra: dict = {}
        for unit in self.units.values():
            extra.update(unit.augment(batch, step))
        return {**batch, **extra} if extra else batch

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict, step: int):
        losses: dict[str, torch.Tensor] = {}
        report: dict[str, float] = {"logit_scale": float(outputs["logit_scale"].detach())}
        if "logit_bias" in outputs:
            report["logit_bias"] = float(outputs["logit_bias"].detach())
        for name, unit in self.units.items():
            loss, unit_report = unit.loss(outputs, batch, step)
            if loss is not None:
                losses[name] = unit.weight * loss
            report.update(unit_report)
        total = sum(losses.values())
        if "unused" in outputs:
            total = total + outputs["unused"]
        return total, losses, report


def clamp_logit_scale(clip: nn.Module, max_logit_scale: float = 100.0) -> None:
    """Keeps 1/tau in [1, max_logit_scale] after each optimizer step (CLIP's clamp)."""
    with torch.no_grad():
        clip.logit_scale.clamp_(0, torch.log(torch.tensor(max_logit_scale)).item())
