"""SigLIP objective: the pairwise sigmoid loss, with a learnable logit bias in the towers."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.options import choice
from pipeline.losses.siglip import SigLipLoss
from pipeline.objectives.base import Unit

# SigLIP's initialisation (Zhai et al. 2023): t' = log 10, b = -10, so that the start is not swamped by negatives.
SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS = math.log(10), -10.0


@dataclass(frozen=True)
class SigLipConfig:
    weight: float = 0.0
    """Weight of the SigLIP sigmoid loss; 0 disables it. Adds a learnable logit bias to the model (init -10)."""
    exchange: str = choice("bidir", "bidir", "shift", "reduce", "gather")
    """How SigLIP's text features travel between ranks (open_clip's SigLipLoss dist_impl): bidir/shift pass
    neighbours' blocks around the ring, so no rank ever holds the global logit matrix."""


class SigLip(Unit):
    name, Config = "siglip", SigLipConfig
    legacy_keys = {"siglip_exchange": "exchange"}
    uses_logit_scale = True

    def card(self) -> str:
        return f"SigLIP: pairwise sigmoid loss, learnable temperature and bias (weight {self.weight:g})"

    def configure_towers(self, model_cfg):
        # in place: open_clip can load a checkpoint with a logit bias only when its config declares one
        if "init_logit_bias" not in model_cfg:
            model_cfg["init_logit_bias"] = SIGLIP_INIT_LOGIT_BIAS
            if not self.root.contrastive.weight:
                model_cfg["init_logit_scale"] = SIGLIP_INIT_LOGIT_SCALE

    def bind(self, world, total_steps):
        self.loss_fn = SigLipLoss(world.rank, world.world_size, self.cfg.exchange)

    def loss(self, outputs, batch, step):
        return self.loss_fn(outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                            outputs["logit_bias"]), {}
