"""Adversarial modality alignment: the discriminator's binary cross-entropy (image = 1, text = 0).

The model applies gradient reversal in front of the discriminator, so minimising this one loss trains the
discriminator to separate the modalities and, through the reversed gradient, the towers to confuse it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdversarialLoss(nn.Module):
    def forward(self, image_logits: torch.Tensor, text_logits: torch.Tensor):
        # image_logits, text_logits [B] -> loss [], discriminator accuracy []
        loss = (F.binary_cross_entropy_with_logits(image_logits, torch.ones_like(image_logits))
                + F.binary_cross_entropy_with_logits(text_logits, torch.zeros_like(text_logits))) / 2
        accuracy = ((image_logits > 0).float().mean() + (text_logits <= 0).float().mean()) / 2
        return loss, accuracy.detach()
