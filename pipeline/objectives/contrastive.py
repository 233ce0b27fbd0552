"""Contrastive (CLIP) objective: symmetric InfoNCE over the pooled features, negatives gathered across ranks."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.losses.contrastive import ContrastiveLoss
from pipeline.objectives.base import Unit


@dataclass(frozen=True)
class ContrastiveConfig:
    weight: float = 1.0
    """Weight of the symmetric InfoNCE (CLIP) loss; 0 disables it."""
    same_modality_negatives: bool = False
    """Add the seed's same-modality negatives (t_i, t_j) and (v_i, v_j) to the InfoNCE denominators."""


class Contrastive(Unit):
    name, Config = "contrastive", ContrastiveConfig
    legacy_keys = {"same_modality_negatives": "same_modality_negatives"}
    uses_logit_scale = True

    def card(self) -> str:
        extra = ", with same-modality negatives" if self.cfg.same_modality_negatives else ""
        return f"contrastive: symmetric InfoNCE, learnable temperature{extra} (weight {self.weight:g})"

    def bind(self, world, total_steps):
        self.loss_fn = ContrastiveLoss(world.rank, world.world_size, self.cfg.same_modality_negatives)

    def loss(self, outputs, batch, step):
        return self.loss_fn(outputs["image_features"], outputs["text_features"], outputs["logit_scale"]), {}
