"""The shared encoding: one image pass and one text pass per step, shaped by what the enabled objectives need.

Each objective unit (pipeline/objectives/) declares its `Needs`; the model encodes their union once and hands every
unit the same `Encoding`. The cost-saving paths live here as properties of that one encoding, not as branches of
each objective: the image pass runs on FLIP's visible patches only and its tokens serve every token reader (MAE's
decoder, attention fusion, ITM); the text pass runs trimmed to the batch's captions, packed several to a tower row;
and a unit's extra bidirectional text pass (MLM's, a `SidePass`) runs batched with it, one embedding lookup for all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.masking import random_keep
from pipeline.models.towers import (encode_image_tokens, encode_text_packed, encode_text_tokens, padding_is_inert,
                                    trimmed_text_length)


@dataclass(frozen=True)
class Needs:
    """What a unit reads beyond the pooled features. Units' needs are OR-ed together."""

    image_tokens: bool = False
    """The image tower's tokens [B, 1 + K, W] (a FLIP-masked pass provides them anyway)."""
    text_tokens: bool = False
    """The text tower's tokens at the caption positions [B, L', W] (trimmed, packed: zeros past end of text)."""
    full_text: bool = False
    """Text tokens at every position of the context [B, L, W] from an unpacked, untrimmed pass."""
    images: bool = False
    """Still images (the unit reads pixels or per-image tokens): video batches are refused."""

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(*(a or b for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple[bool, ...]:
        return (self.image_tokens, self.text_tokens, self.full_text, self.images)


@dataclass
class SidePass:
    """A second, bidirectional pass of the text tower over other ids (MLM's masked input), batched with the
    contrastive pass: one token-embedding lookup for both passes and `extra_ids`, one tower pass over 2B rows.

    Run separately, each lookup's backward wrote its own dense [V, W] embedding gradient (19 MB at 49,408 x 96) and
    every tower weight got two gradients to add: a third of MLM's step time on the 3-layer fmnist-vit56."""

    ids: torch.Tensor
    """[B, L] the pass's input ids; padding where the batch's `text` pads (its rows pool and mask padding by `text`)."""
    replace: torch.Tensor
    """[B, L] bool: positions whose embedding becomes `replacement`."""
    replacement: torch.Tensor
    """[W] the embedding put there (MLM's learned mask embedding)."""
    extra_ids: torch.Tensor | None = None
    """[C] ids whose embedding rows the unit also needs (a sampled softmax's output rows)."""
    payload: object = None
    """The unit's own values from preparing the pass, handed back to its step (MLM: its re-indexed targets)."""


@dataclass
class Encoding:
    """One step's shared encoding of the batch (B samples)."""

    image: torch.Tensor | None                 # [B, 3, H, W] pixels (None for video)
    text: torch.Tensor                         # [B, L] the batch's ids at the full context length
    image_embed: torch.Tensor                  # [B, E] pooled, projected, not normalised (video: mean over frames)
    text_embed: torch.Tensor                   # [B, E]
    image_features: torch.Tensor               # [B, E] L2-normalised
    text_features: torch.Tensor                # [B, E]
    keep: torch.Tensor | None = None           # [B, K] FLIP's visible patches (None: unmasked)
    image_tokens: torch.Tensor | None = None   # [B, 1 + K, W] after ln_post, class token first
    text_ids: torch.Tensor | None = None       # [B, L'] the ids of text_tokens' positions
    text_tokens: torch.Tensor | None = None    # [B, L', W] after ln_final
    side_tokens: torch.Tensor | None = None    # [B, L', W] the side pass's tokens
    side_rows: torch.Tensor | None = None      # [C, W] the embedding rows of SidePass.extra_ids
    side: SidePass | None = None               # the side pass that ran


def encode_batch(clip: nn.Module, batch: dict, needs: Needs, side: SidePass | None = None, trim: bool = True,
                 pack: bool = True) -> Encoding:
    """Encodes `batch` ("image" [B, 3, H, W] or video "frames" [B, T, 3, H, W], "text" [B, L], FLIP's
    "image_mask_ratio") once for every unit: the cheapest passes that provide `needs` and `side`."""
    text = batch["text"]                                        # [B, L]
    frames = batch.get("frames") if "image" not in batch else None
    image = batch["image"] if frames is None else frames.flatten(0, 1)  # [B (x T), 3, H, W]
    ratio = float(batch.get("image_mask_ratio", 0.0))
    keep = None
    if ratio > 0:
        grid = clip.visual.grid_size
        keep = random_keep(image.shape[0], grid[0] * grid[1], ratio, device=image.device)  # [B, K]
    if keep is not None or needs.image_tokens:
        image_embed, image_tokens = encode_image_tokens(clip.visual, image, keep)  # [B, E], [B, 1 + K, W]
    else:
        image_embed, image_tokens = clip.encode_image(image), None
    if frames is not None:
        # A clip's embedding is the mean of its frames' embeddings (CLIP4Clip's parameter-free "meanP").
        image_embed = image_embed.view(frames.shape[0], frames.shape[1], -1).mean(dim=1)  # [B, E]

    enc = Encoding(image=None if frames is not None else image, text=text, image_embed=image_embed,
                   text_embed=None, image_features=None, text_features=None,
                   keep=keep if frames is None else None, image_tokens=image_tokens if frames is None else None)
    if needs.full_text or needs.text_tokens or trim or side is not None:
        # cross-attention fusion reads every text position: the full length, unpacked
        length = text.shape[1] if needs.full_text or not trim else trimmed_text_length(clip, text)  # one host sync
        packed = trim and pack and not needs.full_text and padding_is_inert(clip)
        ids = text[:, :length]                                  # [B, L']
        enc.text_embed, tokens = _encode_text(clip, ids, side, packed, enc)  # [B, E], [B, L', W]
        if needs.text_tokens or needs.full_text:
            enc.text_ids, enc.text_tokens = ids, tokens
    else:
        enc.text_embed = clip.encode_text(text)
    enc.image_features = F.normalize(enc.image_embed, dim=-1)
    enc.text_features = F.normalize(enc.text_embed, dim=-1)
    return enc


def _encode_text(clip: nn.Module, text: torch.Tensor, side: SidePass | None, pack: bool, enc: Encoding):
    """The contrastive text pass over text [B, L] -> (pooled [B, E], tokens [B, L, W]), and the side pass, batched."""
    encode = encode_text_packed if pack else encode_text_tokens
    if side is None:
        return encode(clip, text)
    B, L = text.shape
    # the cut to L drops only padding keys, which the bidirectional pass masks anyway
    lookup = [text.flatten(), side.ids[:, :L].flatten()] + ([] if side.extra_ids is None else [side.extra_ids])
    rows = clip.token_embedding(torch.cat(lookup))              # [2BL (+ C), W]
    side_rows = rows[B * L:2 * B * L].view(B, L, -1)            # [B, L, W]
    side_rows = torch.where(side.replace[:, :L].unsqueeze(-1), side.replacement.to(rows.dtype), side_rows)
    embeddings = torch.cat([rows[:B * L], side_rows.flatten(0, 1)]).view(2 * B, L, -1)  # [2B, L, W]
    bidirectional = torch.arange(2 * B, device=text.device) >= B  # [2B]: the side half
    # both halves pool and mask padding by `text`: the side ids must pad where `text` pads
    pooled, tokens = encode(clip, torch.cat([text, text]), embeddings, bidirectional)
    enc.side, enc.side_tokens = side, tokens[B:]                                # [B, L, W]
    enc.side_rows = None if side.extra_ids is None else rows[2 * B * L:]  # [C, W]
    return pooled[:B], tokens[:B]
