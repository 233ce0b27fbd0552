"""MAE decoder: reconstructs the masked patches from the visible tokens of the FLIP forward (one encoder pass)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer
from torch import nn

from pipeline.models.masking import masked_indices


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p * p * C], patches in the ViT's row-major order."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)                 # [B, C, gh, p, gw, p]
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


class MaeDecoder(nn.Module):
    """A light transformer decoder from the visible tokens of the FLIP forward to the masked patches' pixels.

    `cross` False: MAE's, self-attention over [class + visible + mask tokens] in patch order. True: CrossMAE's, the
    masked positions' queries (mask token + position) cross-attend to the visible tokens, and only they pass the MLP.
    """

    def __init__(self, encoder_width: int, num_patches: int, patch_size: int, width: int = 128, layers: int = 2,
                 heads: int = 4, cross: bool = False):
        super().__init__()
        self.num_patches, self.patch_size, self.cross = num_patches, patch_size, cross
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(num_patches + 1, width))
        if cross:
            self.cross_blocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio=4.0,
                                                                     is_cross_attention=True) for _ in range(layers))
        else:
            self.transformer = Transformer(width, layers, heads, mlp_ratio=4.0)
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_size * patch_size * 3)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """mae_pred and mae_target [B, M, p * p * 3] at the M masked patches only (in patch order, listed by
        mae_masked [B, M]): the output layer and the loss skip the visible patches, which the loss would not count."""
        # tokens [B, 1 + K, We] (class token first), keep [B, K], images [B, 3, H, W]
        B, K = keep.shape
        x = self.embed(tokens)                                             # [B, 1 + K, Wd]
        pos = self.positional_embedding.to(x.dtype)                        # [1 + N, Wd]: class token first
        masked = masked_indices(keep, self.num_patches)                    # [B, M]
        if self.cross:
            # positions by F.embedding: its backward is ~2x faster than indexing's index_put on CPU (measured)
            visible = x + torch.cat([pos[:1].expand(B, 1, -1), F.embedding(1 + keep, pos)], dim=1)  # [B, 1 + K, Wd]
            x = self.mask_token.to(x.dtype) + F.embedding(1 + masked, pos)  # [B, M, Wd]
            for block in self.cross_blocks:
                x = block(x, visible, visible)                             # [B, M, Wd]
        else:
            full = self.mask_token.to(x.dtype).expand(B, self.num_patches, -1).clone()  # [B, N, Wd]
            full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])  # visible tokens in place
            x = self.transformer(torch.cat([x[:, :1], full], dim=1) + pos)  # [B, 1 + N, Wd]
            x = torch.gather(x[:, 1:], 1, masked.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, M, Wd]
        pred = self.pred(self.norm(x))                                     # [B, M, p * p * 3]
        patches = patchify(images, self.patch_size)                        # [B, N, p * p * 3]
        target = torch.gather(patches, 1, masked.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # [B, M, ...]
        return {"mae_pred": pred, "mae_target": target, "mae_masked": masked}
