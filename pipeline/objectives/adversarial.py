"""Adversarial modality alignment: a discriminator on the embeddings played against the towers, through gradient
reversal or alternating turns, with a warm-up of the towers' share."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import choice, require
from pipeline.losses.adversarial import AdversarialLoss
from pipeline.models.discriminator import ModalityDiscriminator
from pipeline.objectives.base import Unit


@dataclass(frozen=True)
class AdversarialConfig:
    weight: float = 0.0
    """Weight of adversarial modality alignment (a discriminator on the embeddings, trained against the towers)."""
    mode: str = choice("reversal", "reversal", "alternating")
    """reversal: one loss, the towers get the discriminator's gradient reversed (Ganin & Lempitsky).
    alternating: the players take turns, one step each: the discriminator learns on detached embeddings, then the
    towers learn to fool a frozen discriminator (flipped labels, GAN's non-saturating loss)."""
    warmup_steps: int = 0
    """Steps over which the reversed gradient reaching the towers ramps up from 0 (the discriminator trains
    at full strength from the start)."""
    hidden: int = 256
    """Hidden width of the modality discriminator."""

    def __post_init__(self):
        require(self.warmup_steps >= 0, "objective.adversarial.warmup_steps", "must be >= 0")
        require(self.hidden > 0, "objective.adversarial.hidden", "must be positive")


class Adversarial(Unit):
    name, Config = "adversarial", AdversarialConfig
    legacy_keys = {"adversarial_mode": "mode", "adversarial_warmup_steps": "warmup_steps",
                   "adversarial_hidden": "hidden"}
    trains_alone = False

    def card(self) -> str:
        return (f"adversarial modality alignment ({self.cfg.mode}, {self.cfg.warmup_steps} warm-up steps; "
                f"weight {self.weight:g})")

    def head(self, clip, model_cfg):
        return ModalityDiscriminator(model_cfg["embed_dim"], self.cfg.hidden)

    def step(self, model, enc, batch):
        head = model.heads[self.name]
        turn = batch.get("adversarial_turn", "reversal")
        out = head(enc.image_features, enc.text_features, float(batch.get("adversarial_scale", 1.0)), turn)
        # the towers' turn: the frozen discriminator's parameters take no part in this step's loss
        return out, [head] if turn == "towers" else []

    def scale(self, step: int) -> float:
        """Strength of the adversarial gradient reaching the towers: linear warm-up from 0 to 1."""
        warmup = self.cfg.warmup_steps
        return min(1.0, step / warmup) if warmup else 1.0

    def turn(self, step: int) -> str:
        """Who learns from the adversarial loss at `step`: both through reversal, or the players in turn."""
        if self.cfg.mode == "reversal":
            return "reversal"
        return "discriminator" if step % 2 == 0 else "towers"

    def bind(self, world, total_steps):
        self.loss_fn = AdversarialLoss()

    def augment(self, batch, step):
        # adversarial_scale: float; adversarial_turn: "reversal" | "discriminator" | "towers"
        return {"adversarial_scale": self.scale(step), "adversarial_turn": self.turn(step)}

    def loss(self, outputs, batch, step):
        turn = self.turn(step)
        # the towers' turn: fool the discriminator (labels flipped), ramped by the warm-up like the reversal
        loss, accuracy = self.loss_fn(outputs["adv_image_logits"], outputs["adv_text_logits"], flip=turn == "towers")
        scale = self.scale(step) if turn == "towers" else 1.0
        return scale * loss, {"discriminator_accuracy": float(accuracy), "adversarial_scale": self.scale(step)}
