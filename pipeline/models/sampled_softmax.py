"""Sampled softmax over a large vocabulary (Jean et al. 2015) for the heads tied to CLIP's 49k-token embedding."""
from __future__ import annotations

import torch


def sample_vocabulary(targets: torch.Tensor, vocab_size: int, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates [C] sorted, targets as indices into them [M]): the batch's own target ids, so that every target is
    scorable, plus `extra` ids drawn uniformly from the vocabulary as negatives."""
    drawn = torch.randint(0, vocab_size, (extra,), device=targets.device)
    candidates = torch.unique(torch.cat([targets, drawn]))          # [C]
    return candidates, torch.searchsorted(candidates, targets)      # [C], [M]
