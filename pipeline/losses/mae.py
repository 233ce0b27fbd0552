"""MAE reconstruction loss: mean squared error on the masked patches only (He et al. 2022)."""
from __future__ import annotations

import torch
from torch import nn


class MaeLoss(nn.Module):
    def __init__(self, norm_pix: bool = True):
        super().__init__()
        self.norm_pix = norm_pix

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # pred, target [B, N, P]; mask [B, N] bool, True where masked
        # at least fp32 (bf16 autocast leaves elementwise ops in bf16), float64 stays float64
        dtype = torch.promote_types(pred.dtype, torch.float32)
        pred, target = pred.to(dtype), target.to(dtype)
        if self.norm_pix:
            # Per-patch normalised targets: the decoder learns structure rather than each patch's brightness.
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)   # [B, N]
        weights = mask.to(dtype)
        return (per_patch * weights).sum() / weights.sum().clamp(min=1)
