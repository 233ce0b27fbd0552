"""Combines the enabled losses, each with its weight, into `(total, losses, report)`; draws each step's masks.

Contract with the loop: `batch = objective.augment(batch, step)`, `outputs = model(batch)`,
`total, losses, report = objective(outputs, batch, step)`; `losses` holds weighted scalar tensors, `report`
floats. Learnable parts (decoders, discriminator, logit scale/bias) live in the model, so the optimizer sees them.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ObjectiveConfig
from pipeline.distributed import World
from pipeline.losses.adversarial import AdversarialLoss
from pipeline.losses.autoencoder import AutoencoderLoss
from pipeline.losses.contrastive import ContrastiveLoss
from pipeline.losses.mae import MaeLoss
from pipeline.losses.mlm import MlmLoss
from pipeline.losses.siglip import SigLipLoss
from pipeline.models.masking import mask_tokens

# Size of open_clip's BPE vocabulary, from which MLM's 10% random replacements are drawn.
VOCAB_SIZE = 49408


class Objective(nn.Module):
    """`total_steps` (the run's train.steps) is needed only for FLIP's final unmasked phase."""

    def __init__(self, cfg: ObjectiveConfig, world: World, total_steps: int | None = None):
        super().__init__()
        if cfg.flip_unmasked_steps and cfg.flip_mask_ratio and total_steps is None:
            raise ValueError("objective.flip_unmasked_steps needs the run's step count: "
                             "build Objective(cfg, world, total_steps=train.steps)")
        self.cfg, self.total_steps = cfg, total_steps
        self.contrastive = (ContrastiveLoss(world.rank, world.world_size, cfg.same_modality_negatives)
                            if cfg.contrastive else None)
        self.siglip = SigLipLoss(world.rank, world.world_size, cfg.siglip_exchange) if cfg.siglip else None
        self.mae = MaeLoss(cfg.mae_norm_pix) if cfg.mae else None
        self.mlm = MlmLoss() if cfg.mlm else None
        self.autoencoder = AutoencoderLoss() if cfg.autoencoder else None
        self.adversarial = AdversarialLoss() if cfg.adversarial else None

    def image_mask_ratio(self, step: int) -> float:
        """FLIP's ratio at `step`: 0 during the final `flip_unmasked_steps`."""
        cfg = self.cfg
        if cfg.flip_unmasked_steps and step >= self.total_steps - cfg.flip_unmasked_steps:
            return 0.0
        return cfg.flip_mask_ratio

    def adversarial_scale(self, step: int) -> float:
        """Strength of the adversarial gradient reaching the towers: linear warm-up from 0 to 1."""
        warmup = self.cfg.adversarial_warmup_steps
        return min(1.0, step / warmup) if warmup else 1.0

    def adversarial_turn(self, step: int) -> str:
        """Who learns from the adversarial loss at `step`: both through reversal, or the players in turn."""
        if self.cfg.adversarial_mode == "reversal":
            return "reversal"
        return "discriminator" if step % 2 == 0 else "towers"

    def augment(self, batch: dict, step: int) -> dict:
        """The batch plus this step's masks (a new dict; the same batch when nothing is masked).

        image_mask_ratio: float (the model draws the patches: only it knows the patch grid);
        mlm_input [B, L], mlm_mask_token [B, L] bool, mlm_labels [B, L] (-100 where not chosen);
        adversarial_scale: float; adversarial_turn: "reversal" | "discriminator" | "towers".
        """
        extra: dict = {}
        if self.cfg.flip_mask_ratio and self.image_mask_ratio(step) > 0:
            extra["image_mask_ratio"] = self.image_mask_ratio(step)
        if self.mlm is not None:
            mlm_input, mask_token, labels = mask_tokens(batch["text"], self.cfg.mlm_mask_ratio, VOCAB_SIZE)
            extra.update(mlm_input=mlm_input, mlm_mask_token=mask_token, mlm_labels=labels)
        if self.adversarial is not None:
            extra.update(adversarial_scale=self.adversarial_scale(step), adversarial_turn=self.adversarial_turn(step))
        return {**batch, **extra} if extra else batch

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict, step: int):
        cfg = self.cfg
        losses: dict[str, torch.Tensor] = {}
        report: dict[str, float] = {"logit_scale": float(outputs["logit_scale"].detach())}
        if self.contrastive is not None:
            losses["contrastive"] = cfg.contrastive * self.contrastive(
                outputs["image_features"], outputs["text_features"], outputs["logit_scale"])
        if self.siglip is not None:
            losses["siglip"] = cfg.siglip * self.siglip(
                outputs["image_features"], outputs["text_features"], outputs["logit_scale"], outputs["logit_bias"])
        if "logit_bias" in outputs:
            report["logit_bias"] = float(outputs["logit_bias"].detach())
        if self.mae is not None and "mae_pred" in outputs:
            losses["mae"] = cfg.mae * self.mae(outputs["mae_pred"], outputs["mae_target"])
        if "image_keep" in outputs:
            report["image_mask_ratio"] = self.image_mask_ratio(step)
        if self.mlm is not None and "mlm_logits" in outputs:
            losses["mlm"] = cfg.mlm * self.mlm(outputs["mlm_logits"], outputs["mlm_targets"])
            if outputs["mlm_targets"].numel():
                report["mlm_accuracy"] = float((outputs["mlm_logits"].argmax(-1) == outputs["mlm_targets"])
                                               .float().mean())
        if self.autoencoder is not None:
            total, text_loss, image_loss = self.autoencoder(
                outputs["ae_image_pred"], outputs["ae_image_target"], outputs["ae_text_logits"],
                outputs["ae_text_targets"])
            losses["autoencoder"] = cfg.autoencoder * total
            report.update(autoencoder_text=float(text_loss.detach()), autoencoder_image=float(image_loss.detach()))
        if self.adversarial is not None:
            turn = self.adversarial_turn(step)
            # the towers' turn: fool the discriminator (labels flipped), ramped by the warm-up like the reversal
            adv_loss, accuracy = self.adversarial(outputs["adv_image_logits"], outputs["adv_text_logits"],
                                                  flip=turn == "towers")
            scale = self.adversarial_scale(step) if turn == "towers" else 1.0
            losses["adversarial"] = cfg.adversarial * scale * adv_loss
            report.update(discriminator_accuracy=float(accuracy), adversarial_scale=self.adversarial_scale(step))
        total = sum(losses.values())
        if "unused" in outputs:
            total = total + outputs["unused"]
        return total, losses, report


def clamp_logit_scale(clip: nn.Module, max_logit_scale: float = 100.0) -> None:
    """Keeps 1/tau in [1, max_logit_scale] after each optimizer step (CLIP's clamp)."""
    with torch.no_grad():
        clip.logit_scale.clamp_(0, torch.log(torch.tensor(max_logit_scale)).item())
