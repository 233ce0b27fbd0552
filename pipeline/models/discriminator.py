"""Adversarial modality alignment: a discriminator on the embeddings behind a gradient reversal layer.

The discriminator learns to tell image embeddings from text embeddings; the reversed gradient drives both
towers to make them indistinguishable (the seed's min-max game, played in one backward pass, Ganin & Lempitsky).
"""
from __future__ import annotations

import torch
from torch import nn


class GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the gradient by -scale backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


class ModalityDiscriminator(nn.Module):
    def __init__(self, embed_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: float):
        # features [B, D] -> logits [B] each; positive means "image"
        logits = self.net(GradReverse.apply(torch.cat([image_features, text_features]), scale)).squeeze(-1)
        return {"adv_image_logits": logits[: image_features.shape[0]],
                "adv_text_logits": logits[image_features.shape[0]:]}
