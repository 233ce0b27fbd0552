"""Combines the enabled losses, each with its weight, into `(total, losses, report)`."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ObjectiveConfig
from pipeline.distributed import World
from pipeline.losses.contrastive import ContrastiveLoss

# open_clip clamps the learnable temperature so that 1/tau <= 100.
MAX_LOGIT_SCALE = 100.0


class Objective(nn.Module):
    def __init__(self, cfg: ObjectiveConfig, world: World):
        super().__init__()
        self.cfg = cfg
        self.contrastive = ContrastiveLoss(world.rank, world.world_size) if cfg.contrastive else None

    def augment(self, batch: dict, step: int) -> dict:
        """Adds the step's masks to the batch (none yet: a no-op)."""
        return batch

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict, step: int):
        losses: dict[str, torch.Tensor] = {}
        if self.contrastive is not None:
            losses["contrastive"] = self.cfg.contrastive * self.contrastive(
                outputs["image_features"], outputs["text_features"], outputs["logit_scale"])
        total = sum(losses.values())
        report = {"logit_scale": float(outputs["logit_scale"].detach())}
        return total, losses, report


def clamp_logit_scale(clip: nn.Module) -> None:
    """Keeps 1/tau in [1, 100] after each optimizer step (CLIP's clamp)."""
    with torch.no_grad():
        clip.logit_scale.clamp_(0, torch.log(torch.tensor(MAX_LOGIT_SCALE)).item())
