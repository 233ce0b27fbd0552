"""Adversarial modality alignment: the discriminator's binary cross-entropy (image = 1, text = 0).

With gradient reversal in front of the discriminator, minimising this one loss trains the discriminator to
separate the modalities and, through the reversed gradient, the towers to confuse it. With alternating updates
the towers' turn minimises it with the labels flipped, through a frozen discriminator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdversarialLoss(nn.Module):
    def forward(self, image_logits: torch.Tensor, text_logits: torch.Tensor, flip: bool = False):
        # image_logits, text_logits [B] -> loss [], discriminator accuracy []
        # flip: the towers' turn of alternating updates, whose goal is the opposite labels
        image_label, text_label = (0.0, 1.0) if flip else (1.0, 0.0)
        loss = (F.binary_cross_entropy_with_logits(image_logits, torch.full_like(image_logits, image_label))
                + F.binary_cross_entropy_with_logits(text_logits, torch.full_like(text_logits, text_label))) / 2
        accuracy = ((image_logits > 0).float().mean() + (text_logits <= 0).float().mean()) / 2
        return loss, accuracy.detach()
