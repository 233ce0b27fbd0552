"""Masked language modeling loss: cross-entropy over the vocabulary at the masked positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MlmLoss(nn.Module):
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # logits [M, V] at the M chosen positions of the batch; targets [M] original token ids
        if targets.numel() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, targets)
