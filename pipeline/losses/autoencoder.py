"""The seed's multimodal autoencoder loss L = L_txt(x_t, x̂_t) + L_img(x_i, x̂_i)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AutoencoderLoss(nn.Module):
    """L_img: mean squared error over the (normalised) input pixels; L_txt: token cross-entropy over the
    caption's real positions (start to end of text). Returns (L, L_txt, L_img)."""

    def forward(self, image_pred: torch.Tensor, image_target: torch.Tensor, text_logits: torch.Tensor,
                text_targets: torch.Tensor):
        # image_pred/target [B, 3, H, W]; text_logits [M, V]; text_targets [M]
        image_loss = F.mse_loss(image_pred, image_target)
        text_loss = F.cross_entropy(text_logits, text_targets)
        return text_loss + image_loss, text_loss, image_loss
