"""The seed's symmetric InfoNCE (CLIP) loss, distributed with local-loss + gather-with-grad semantics.

Written here rather than taken from open_clip's ClipLoss because that class has no same-modality negatives;
the distributed scheme is the same: each rank scores its own B rows against the N = B x world gathered columns
(memory O(B x N), not O(N x N)), and gradients flow back through the gather to the rank that owns each column.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """[B, D] on each rank -> [world * B, D] in rank order; backward sums each block's gradient on its owner."""
    if world_size == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


class ContrastiveLoss(nn.Module):
    """L = 1/(2N) sum_i [l(v_i, t_i) + l(t_i, v_i)], l(a_i, b_i) = -log softmax_j(s a_i . b_j)[i].

    With `same_modality_negatives` (the seed's extra negatives), each anchor's denominator also holds the
    other samples of its own modality: image i competes against t_j for all j and v_j for j != i.
    The returned value is this rank's mean; averaged over ranks it equals the loss on the global batch.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, same_modality_negatives: bool = False):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.same_modality_negatives = same_modality_negatives

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        # image_features, text_features [B, D] L2-normalised; logit_scale [] = 1 / tau
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"ContrastiveLoss for {self.world_size} ranks needs an initialised process group")
        B = image_features.shape[0]
        all_images = gather_with_grad(image_features, self.world_size)   # [N, D]
        all_texts = gather_with_grad(text_features, self.world_size)     # [N, D]
        labels = torch.arange(B, device=image_features.device) + self.rank * B  # [B] own columns
        image_logits = logit_scale * image_features @ all_texts.t()      # [B, N]
        text_logits = logit_scale * text_features @ all_images.t()       # [B, N]
        if self.same_modality_negatives:
            own = F.one_hot(labels, all_images.shape[0]).bool()          # [B, N] the anchor itself
            image_self = (logit_scale * image_features @ all_images.t()).masked_fill(own, float("-inf"))
            text_self = (logit_scale * text_features @ all_texts.t()).masked_fill(own, float("-inf"))
            image_logits = torch.cat([image_logits, image_self], dim=1)  # [B, 2N]
            text_logits = torch.cat([text_logits, text_self], dim=1)     # [B, 2N]
        return (F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)) / 2
