"""SigLIP's pairwise sigmoid loss, distributed without ever materialising the global logit matrix.

open_clip's SigLipLoss does exactly that: each rank scores its image block against its own text block, then
passes text blocks to its ring neighbours (with gradients) and scores each arriving block, so a rank holds at
most B x B logits at a time. This module only adapts it to the objective's calling convention.
"""
from __future__ import annotations

import torch
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss
from torch import nn


class SigLipLoss(nn.Module):
    """L = -1/N sum_{i,j} log sigmoid(z_ij (s v_i . t_j + b)), z_ij = 1 if i = j else -1, over the global batch.

    The returned value is this rank's share (its B rows against all N columns, divided by B); averaged over
    ranks it equals the loss on the global batch.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, exchange: str = "bidir"):
        super().__init__()
        self.loss = OpenClipSigLipLoss(rank=rank, world_size=world_size, dist_impl=exchange)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
        # features [B, D] L2-normalised; logit_scale [] (exp'd), logit_bias []
        return self.loss(image_features, text_features, logit_scale, logit_bias)
