"""Adversarial modality alignment: a discriminator on the embeddings, played against the towers.

The discriminator learns to tell image embeddings from text embeddings; the towers learn to make them
indistinguishable (the seed's min-max game). Two ways to play it:
  reversal      one backward pass through a gradient reversal layer (Ganin & Lempitsky);
  alternating   turns: a discriminator step on detached embeddings, then a tower step through a frozen copy of
                the discriminator's parameters (the towers' loss is the objective's, with flipped labels).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


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

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: float,
                turn: str = "reversal"):
        """features [B, D] -> logits [B] each (positive means "image"). `turn`: "reversal", or for alternating
        updates "discriminator" (only the discriminator learns) or "towers" (only the towers learn)."""
        x = torch.cat([image_features, text_features])                    # [2B, D]
        if turn == "reversal":
            logits = self.net(GradReverse.apply(x, scale))
        elif turn == "discriminator":
            logits = self.net(x.detach())
        else:  # towers: gradients flow into the features, none into the discriminator
            frozen = {name: p.detach() for name, p in self.net.named_parameters()}
            logits = functional_call(self.net, frozen, (x,))
        logits = logits.squeeze(-1)                                       # [2B]
        return {"adv_image_logits": logits[: image_features.shape[0]],
                "adv_text_logits": logits[image_features.shape[0]:]}
