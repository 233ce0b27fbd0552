"""The seed's multimodal autoencoder: fuse the two towers' embeddings into one joint embedding h and decode
both inputs back from h (image pixels, text tokens); the loss is L = L_txt + L_img (pipeline/losses/autoencoder.py).
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models.sampled_softmax import sample_vocabulary

from pipeline.models.towers import text_padding_mask


class ConcatFusion(nn.Module):
    """h = W [h_t; h_i]."""

    def __init__(self, embed_dim: int, joint_dim: int, **_):
        super().__init__()
        self.proj = nn.Linear(2 * embed_dim, joint_dim)

    def forward(self, h_t, h_i, **_):
        return self.proj(torch.cat([h_t, h_i], dim=-1))                    # [B, J]


class BilinearFusion(nn.Module):
    """h_k = h_t^T W_k h_i with each W_k factorised as U diag(p_k) V^T (rank R): a full bilinear map would need
    D x D x J weights; the factorised one needs (2D + J) x R (low-rank bilinear pooling, Kim et al. 2017)."""

    def __init__(self, embed_dim: int, joint_dim: int, rank: int = 128, **_):
        super().__init__()
        self.u = nn.Linear(embed_dim, rank, bias=False)
        self.v = nn.Linear(embed_dim, rank, bias=False)
        self.p = nn.Linear(rank, joint_dim)

    def forward(self, h_t, h_i, **_):
        return self.p(self.u(h_t) * self.v(h_i))                           # [B, J]


class AttentionFusion(nn.Module):
    """h = attention(h_t, h_i): the pooled text and image embeddings query the tokens of both towers."""

    def __init__(self, embed_dim: int, joint_dim: int, image_width: int, text_width: int, heads: int = 4, **_):
        super().__init__()
        self.query = nn.Linear(embed_dim, joint_dim)
        self.image_kv = nn.Linear(image_width, joint_dim)
        self.text_kv = nn.Linear(text_width, joint_dim)
        self.attn = nn.MultiheadAttention(joint_dim, heads, batch_first=True)
        self.out = nn.Linear(2 * joint_dim, joint_dim)

    def forward(self, h_t, h_i, image_tokens, text_tokens, text):
        q = self.query(torch.stack([h_t, h_i], dim=1))                     # [B, 2, J]
        kv = torch.cat([self.image_kv(image_tokens), self.text_kv(text_tokens)], dim=1)  # [B, 1 + K + L, J]
        pad = torch.cat([torch.zeros(image_tokens.shape[:2], dtype=torch.bool, device=text.device),
                         text_padding_mask(text)], dim=1)                  # [B, 1 + K + L] keys to ignore
        x, _ = self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)  # [B, 2, J]
        return self.out(x.flatten(1))                                      # [B, J]


FUSIONS = {"concat": ConcatFusion, "bilinear": BilinearFusion, "attention": AttentionFusion}


class FusionAutoencoder(nn.Module):
    """Fusion -> joint embedding [B, J] -> image decoder (pixels) and text decoder (token logits, tied)."""

    def __init__(self, fusion: str, embed_dim: int, joint_dim: int, image_size: int, context_length: int,
                 image_width: int, text_width: int, vocab_size: int, bilinear_rank: int = 128,
                 text_candidates: int = 0):
        super().__init__()
        self.vocab_size, self.text_candidates = vocab_size, text_candidates
        self.fusion_type = fusion
        self.fusion = FUSIONS[fusion](embed_dim=embed_dim, joint_dim=joint_dim, rank=bilinear_rank,
                                      image_width=image_width, text_width=text_width)
        self.image_size = image_size
        self.image_decoder = nn.Sequential(nn.Linear(joint_dim, 2 * joint_dim), nn.GELU(),
                                           nn.Linear(2 * joint_dim, 3 * image_size * image_size))
        self.text_queries = nn.Parameter(0.02 * torch.randn(context_length, text_width))
        self.text_in = nn.Linear(joint_dim, text_width)
        self.text_mlp = nn.Sequential(nn.GELU(), nn.Linear(text_width, text_width))
        self.text_norm = nn.LayerNorm(text_width)
        self.text_bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h_t, h_i, images, text, token_embedding: nn.Embedding, image_tokens=None, text_tokens=None):
        # h_t, h_i [B, E]; images [B, 3, H, W]; text [B, L]; tokens only for attention fusion
        joint = self.fusion(h_t, h_i, image_tokens=image_tokens, text_tokens=text_tokens, text=text)  # [B, J]
        image_pred = self.image_decoder(joint).view(-1, 3, self.image_size, self.image_size)  # [B, 3, H, W]
        x = self.text_in(joint)[:, None] + self.text_queries[None]         # [B, L, Wt]
        x = self.text_norm(x + self.text_mlp(x))
        # Logits only at real positions (start of text .. end of text): padding is not part of the input to
        # reconstruct, and a [B, L, V] tensor would be ~50k wide per position.
        real = ~text_padding_mask(text)                                    # [B, L]
        targets = text[real]                                               # [M]
        weight, bias = token_embedding.weight, self.text_bias
        if self.text_candidates:
            candidates, targets = sample_vocabulary(targets, self.vocab_size, self.text_candidates)  # [C], [M]
            weight, bias = weight[candidates], bias[candidates]
        logits = x[real] @ weight.t().to(x.dtype) + bias.to(x.dtype)       # [M, V] (or [M, C])
        return {"joint": joint, "ae_image_pred": image_pred,
                "ae_image_target": images,
                "ae_text_logits": logits, "ae_text_targets": targets}
