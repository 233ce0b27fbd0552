"""The seed's symmetric InfoNCE (CLIP) loss, distributed with local-loss + gather-with-grad semantics."""
from __future__ import annotations

import torch
from open_clip.loss import ClipLoss
from torch import nn


class ContrastiveLoss(nn.Module):
    """L = 1/(2N) sum_i [l(t_i, v_i) + l(v_i, t_i)] over the global batch.

    open_clip's ClipLoss with local_loss + gather_with_grad: each rank scores its own rows against the gathered
    columns, so memory is O(local x global) and gradients flow through the gather.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                             rank=rank, world_size=world_size)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        # image_features, text_features [B, D] L2-normalised; logit_scale [] = 1 / tau
        return self.loss(image_features, text_features, logit_scale)
