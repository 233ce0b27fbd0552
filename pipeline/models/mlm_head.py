"""Masked language modeling head on the open_clip text tower, its output layer tied to the token embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.sampled_softmax import sample_vocabulary


class MlmHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then logits = h @ E^T + b with E the token embedding.

    The embedding is passed in at call time (not stored) so that it stays a parameter of the open_clip model
    alone and the export is unaffected. The learned mask embedding stands in for a [MASK] id, which CLIP's
    vocabulary lacks.
    """

    def __init__(self, width: int, vocab_size: int, candidates: int = 0):
        super().__init__()
        self.vocab_size, self.candidates = vocab_size, candidates
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(width))
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def embed(self, token_embedding: nn.Embedding, ids: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        # ids [B, L], mask_token [B, L] bool -> [B, L, W]
        x = token_embedding(ids)
        return torch.where(mask_token.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)

    def forward(self, hidden: torch.Tensor, token_embedding: nn.Embedding,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets): over the whole vocabulary [M, V], or, with `candidates` while training (gradients
        on), over the targets plus that many sampled ids [M, C] with the targets re-indexed. Evaluation under
        no_grad always scores the whole vocabulary, so reported MLM losses stay comparable."""
        # hidden [M, W] at the masked positions only: a full [B, L, V] logit tensor would be ~50k wide per token
        h = self.norm(F.gelu(self.dense(hidden)))
        weight, bias = token_embedding.weight, self.bias
        if self.candidates and torch.is_grad_enabled():
            candidates, targets = sample_vocabulary(targets, self.vocab_size, self.candidates)  # [C], [M]
            weight, bias = weight[candidates], bias[candidates]
        return h @ weight.t().to(h.dtype) + bias.to(h.dtype), targets   # [M, V or C], [M]
