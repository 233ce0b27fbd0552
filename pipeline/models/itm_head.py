"""The image-text matching head: a small fusion encoder over caption tokens that cross-attend to image tokens, and
a matched / not-matched classifier (ALBEF, BLIP, FLAVA)."""
from __future__ import annotations

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from pipeline.models.towers import text_padding_mask


class ItmHead(nn.Module):
    """Each layer: self-attention over the caption's tokens (bidirectional, padding keys masked), cross-attention
    from them to the image's tokens, each with its MLP. The caption's end-of-text token (the text tower's pooling
    position) feeds a two-way classifier: logit 1 = matched."""

    def __init__(self, text_width: int, image_width: int, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.text_in = nn.Linear(text_width, width)
        self.image_in = nn.Linear(image_width, width)
        self.self_blocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.cross_blocks = nn.ModuleList(ResidualAttentionBlock(width, heads, is_cross_attention=True)
                                          for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, 2)

    def forward(self, text_tokens: torch.Tensor, text_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """text_tokens [P, L, Wt] with their ids [P, L], image_tokens [P, T, Wi] -> logits [P, 2] for P pairs."""
        P, L = text_ids.shape
        x = self.text_in(text_tokens)                                      # [P, L, W]
        image = self.image_in(image_tokens)                                # [P, T, W]
        pad = torch.zeros(text_ids.shape, dtype=x.dtype, device=x.device).masked_fill(
            text_padding_mask(text_ids), float("-inf"))                    # [P, L] padding keys
        mask = pad[:, None, None, :].expand(P, self.heads, L, L).reshape(P * self.heads, L, L)
        for self_block, cross_block in zip(self.self_blocks, self.cross_blocks):
            x = self_block(x, attn_mask=mask)                              # [P, L, W]
            x = cross_block(x, image, image)                               # [P, L, W]
        pooled = self.norm(x[torch.arange(P, device=x.device), text_ids.argmax(dim=-1)])  # [P, W] end of text
        return self.classifier(pooled)                                     # [P, 2]
