"""FLIP: the image tower encodes a random subset of the patches (no loss of its own), with an unmasked phase at the
end. The shared encoding draws the patches (only the model knows the patch grid); MAE reads the same pass."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import require
from pipeline.models.towers import check_vit
from pipeline.objectives.base import Unit


@dataclass(frozen=True)
class FlipConfig:
    mask_ratio: float = 0.0
    """FLIP: fraction of image patches masked in the contrastive forward (the tower sees only the rest)."""
    unmasked_steps: int = 0
    """FLIP: final steps trained without masking (FLIP's unmasked tuning phase); needs the run's step count."""

    def __post_init__(self):
        require(0 <= self.mask_ratio < 1, "objective.flip.mask_ratio", "must lie in [0, 1)")
        require(self.unmasked_steps >= 0, "objective.flip.unmasked_steps", "must be >= 0")


class Flip(Unit):
    name, Config = "flip", FlipConfig
    legacy_keys = {"flip_mask_ratio": "mask_ratio", "flip_unmasked_steps": "unmasked_steps"}
    trains_alone = False

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.mask_ratio > 0

    def card(self) -> str:
        tail = f", the last {self.cfg.unmasked_steps} steps unmasked" if self.cfg.unmasked_steps else ""
        return f"FLIP: {self.cfg.mask_ratio:.0%} of the image patches masked{tail}"

    def head(self, clip, model_cfg):
        check_vit(clip, "objective.flip.mask_ratio")
        return None

    def bind(self, world, total_steps):
        if self.cfg.unmasked_steps and total_steps is None:
            raise ValueError("objective.flip.unmasked_steps needs the run's step count: "
                             "build Objective(cfg, world, total_steps=train.steps)")
        self.total_steps = total_steps

    def mask_ratio(self, step: int) -> float:
        """FLIP's ratio at `step`: 0 during the final `unmasked_steps`."""
        if self.cfg.unmasked_steps and step >= self.total_steps - self.cfg.unmasked_steps:
            return 0.0
        return self.cfg.mask_ratio

    def augment(self, batch, step):
        # image_mask_ratio: float (the model draws the patches: only it knows the patch grid)
        ratio = self.mask_ratio(step)
        return {"image_mask_ratio": ratio} if ratio > 0 else {}

    def loss(self, outputs, batch, step):
        return None, ({"image_mask_ratio": self.mask_ratio(step)} if "image_keep" in outputs else {})
