"""Random masks: FLIP/MAE patch masking and BERT-style token masking, with exact per-sample counts.

Exact counts (not Bernoulli draws) keep every sample's sequence the same length, so the visible patches of a
batch stack into one tensor and the image tower's cost drops by exactly the masked fraction.
"""
from __future__ import annotations

import torch

# open_clip's BPE vocabulary: ids 49406/49407 are start/end of text, 0 is padding.
SOT_ID, EOT_ID = 49406, 49407
IGNORE_INDEX = -100


def num_masked(total: int, ratio: float) -> int:
    """How many of `total` positions a ratio masks (rounded, at least one visible patch left)."""
    return min(total - 1, int(round(ratio * total)))


def random_keep(batch_size: int, num_patches: int, ratio: float, device=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the visible patches, [B, K] sorted per row, K = N - round(ratio * N) (MAE's random_masking)."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)  # [B, N]
    keep = noise.argsort(dim=1)[:, : num_patches - num_masked(num_patches, ratio)]  # [B, K]
    return keep.sort(dim=1).values


def keep_to_mask(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, K] visible indices -> [B, N] bool, True where the patch is masked."""
    mask = torch.ones(keep.shape[0], num_patches, dtype=torch.bool, device=keep.device)
    return mask.scatter(1, keep, False)


def masked_indices(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, K] visible indices -> [B, N - K] masked indices, sorted per row (no host sync, unlike nonzero)."""
    masked = keep_to_mask(keep, num_patches).to(torch.uint8)                 # [B, N]
    order = masked.argsort(dim=1, descending=True, stable=True)             # masked first, each part in order
    return order[:, : num_patches - keep.shape[1]]


def mask_tokens(text: torch.Tensor, ratio: float, vocab_size: int, generator: torch.Generator | None = None):
    """BERT masking over the real tokens (between start and end of text): exactly max(1, round(ratio * n))
    of each row's n real tokens are chosen; of those 80% become the mask token, 10% a random token, 10% stay.

    text [B, L] -> mlm_input [B, L] (ids; mask positions keep their id, the model swaps in its mask
    embedding), mlm_mask_token [B, L] bool (the 80%), mlm_labels [B, L] (original id where chosen, else -100).
    """
    B, L = text.shape
    positions = torch.arange(L, device=text.device)
    eot = text.argmax(dim=-1, keepdim=True)                               # [B, 1]
    real = (positions[None] > 0) & (positions[None] < eot)                # [B, L]
    num_real = real.sum(dim=1)                                            # [B]
    count = torch.clamp(torch.round(num_real.float() * ratio), min=1).long().minimum(num_real)  # [B]
    scores = torch.rand(B, L, device=text.device, generator=generator).masked_fill(~real, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)                           # [B, L] rank of each position's score
    chosen = rank < count[:, None]                                        # [B, L] exactly `count` per row
    kind = torch.rand(B, L, device=text.device, generator=generator)
    as_mask = chosen & (kind < 0.8)
    as_random = chosen & (kind >= 0.8) & (kind < 0.9)
    random_ids = torch.randint(1, min(SOT_ID, vocab_size), (B, L), device=text.device, generator=generator)
    mlm_input = torch.where(as_random, random_ids, text)
    labels = torch.where(chosen, text, torch.full_like(text, IGNORE_INDEX))
    return mlm_input, as_mask, labels
