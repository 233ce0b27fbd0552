"""Masked language modeling head on the open_clip text tower, its output layer tied to the token embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.sampled_softmax import sample_vocabulary


class MlmHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then logits = h @ E^T + b with E the token embedding.

    The embedding rows are passed in at call time (not stored) so that the embedding stays a parameter of the
    open_clip model alone and the export is unaffected. The learned mask embedding stands in for a [MASK] id, which CLIP's
    vocabulary lacks.
    """

    def __init__(self, width: int, vocab_size: int, candidates: int = 0):
        super().__init__()
        self.vocab_size, self.candidates = vocab_size, candidates
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(width))
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def output_ids(self, targets: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(candidates, targets): with `candidates` while training (gradients on), the targets plus that many sampled
        ids [C] and the targets re-indexed into them [M]; else (None, targets): the whole vocabulary. Evaluation under
        no_grad always scores the whole vocabulary, so reported MLM losses stay comparable."""
        if self.candidates and torch.is_grad_enabled():
            return sample_vocabulary(targets, self.vocab_size, self.candidates)
        return None, targets

    def mask(self, rows: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """rows [B, L, W] (the embedded MLM input), mask_token [B, L] bool -> [B, L, W] with the mask embedding
        swapped in."""
        return torch.where(mask_token.unsqueeze(-1), self.mask_embedding.to(rows.dtype), rows)

    def forward(self, hidden: torch.Tensor, output_rows: torch.Tensor,
                candidates: torch.Tensor | None) -> torch.Tensor:
        """hidden [M, W] at the masked positions only (a full [B, L, V] logit tensor would be ~50k wide per token);
        output_rows: the embedding rows of the scored ids, [V, W] or [C, W] -> logits [M, V or C]."""
        h = self.norm(F.gelu(self.dense(hidden)))
        bias = self.bias if candidates is None else self.bias[candidates]
        return h @ output_rows.t().to(h.dtype) + bias.to(h.dtype)
