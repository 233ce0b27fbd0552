"""Captioning (CoCa, Yu et al. 2022): a causal text decoder over the text tower's tokens, cross-attending to the
image tower's tokens, trained with next-token cross-entropy on the caption.

Both inputs come from the shared encoding: the image tokens of the one image pass (FLIP's visible ones when
masking: the decoder then learns to caption from half the patches, and generation later sees all of them) and the
text tokens of the contrastive text pass (CoCa's unimodal half), so the unit adds the decoder's compute only.
The head is open_clip's `MultimodalTransformer` (pipeline/models/caption_head.py); an export is an open_clip CoCa.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.options import require
from pipeline.models.caption_head import PAD_ID, build_decoder, caption_logits, multimodal_cfg
from pipeline.models.encoding import Needs
from pipeline.models.towers import check_text_transformer, check_vit
from pipeline.objectives.base import Unit
from pipeline.train.distributed import all_reduce_sum

MIN_CONTEXT = 8
"""Text context (tokens, start and end included) below which captions are cut to a few words."""


@dataclass(frozen=True)
class CaptionConfig:
    weight: float = 0.0
    """Weight of the captioning loss; 0 disables it. CoCa (paper and open_clip_train's
    --coca-caption-loss-weight) weights it 2.0 against the contrastive loss's 1.0."""
    layers: int = 2
    """Blocks of the text decoder (each: causal self-attention, cross-attention to the image tokens, MLP).
    CoCa splits the text side in half: as many decoder blocks as text tower blocks (12 + 12 in CoCa-Base)."""
    heads: int = 4
    """Attention heads of the decoder; its width is the text tower's and must be a multiple of this."""
    label_smoothing: float = 0.0
    """Label smoothing of the next-token cross-entropy. open_clip_train's CoCaLoss uses none (0.0), as here."""
    train_image: bool = True
    """Let the caption loss's gradient reach the image tower (CoCa). false: the decoder reads detached image
    tokens, a captioner on top of the image representation that does not change it."""

    def __post_init__(self):
        for name in ("layers", "heads"):
            require(getattr(self, name) > 0, f"objective.caption.{name}", "must be positive")
        require(0 <= self.label_smoothing < 1, "objective.caption.label_smoothing",
                f"must lie in [0, 1), got {self.label_smoothing}")


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per caption, the sum of its next-token cross-entropies [B]: logits [B, L, V], labels [B, L] (0 = padding,
    ignored, as in open_clip's CoCaLoss)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=PAD_ID,
                                label_smoothing=label_smoothing, reduction="none")  # [B L], 0 at padding
    return per_token.view(labels.shape).sum(dim=1)


def mean_over_tokens(sums: torch.Tensor, counts: torch.Tensor, world_size: int = 1) -> torch.Tensor:
    """sum(sums) / the number of labels: with `world_size` > 1 divided by the mean count of labels per rank
    (all-reduced), not by this rank's own count. Captions differ in length, so per-rank means would weight a token
    of a rank with short captions more, and DDP's average of the ranks' gradients would not be the gradient of the
    global batch's mean (open_clip's CoCaLoss has that bias). This way the ranks' mean loss and averaged gradients
    are those of one process on the whole batch."""
    count = counts.sum().to(sums.dtype)
    if world_size > 1:
        count = all_reduce_sum(count) / world_size
    return sums.sum() / count.clamp(min=1)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                 world_size: int = 1) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding labels (logits [B, L, V], labels [B, L])."""
    return mean_over_tokens(token_loss_sums(logits, labels, label_smoothing), (labels != PAD_ID).sum(dim=1),
                            world_size)


def caption_outputs(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> dict:
    """The unit's outputs: per caption [B], the sum of its token losses and its count of labels. Per-sample
    scalars, not the logits: the micro-batches of gradient accumulation trim their text to different lengths,
    and their outputs are cached and concatenated (pipeline/train/accumulate.py), which [B, L, 49408] logits of
    differing L would neither allow nor afford."""
    return {"caption_nll": token_loss_sums(logits, labels, label_smoothing),
            "caption_tokens": (labels != PAD_ID).sum(dim=1)}


class Caption(Unit):
    name, Config = "caption", CaptionConfig
    video = False

    def card(self) -> str:
        return (f"captioning (CoCa): {self.cfg.layers}-block text decoder cross-attending to the image tokens, "
                f"next-token cross-entropy (weight {self.weight:g})")

    def configure_towers(self, model_cfg):
        # recorded in the run's model config, so an export knows to write a CoCa (build_clip ignores it)
        model_cfg["multimodal_cfg"] = multimodal_cfg(model_cfg, self.cfg.layers, self.cfg.heads)

    def head(self, clip, model_cfg):
        check_vit(clip, "objective.caption")
        check_text_transformer(clip, "objective.caption")
        text, vision = clip.transformer.width, clip.visual.transformer.width
        require(clip.attn_mask is not None, "objective.caption",
                "needs a causal text tower (the decoder would see the next token); the model's text_cfg sets "
                "no_causal_mask")
        require(text == vision, "objective.caption",
                f"the decoder reads the image tokens at the text tower's width: the model's image width {vision} "
                f"and text width {text} differ (choose a model.name whose towers are equally wide)")
        require(text % self.cfg.heads == 0, "objective.caption.heads",
                f"must divide the text tower's width {text}")
        require(clip.visual.attn_pool is None, "objective.caption",
                "needs a ViT without an attentional pooler (the decoder reads the patch tokens)")
        context = clip.context_length
        require(context >= MIN_CONTEXT, "objective.caption",
                f"the model's text context of {context} tokens is too short for captions (needs >= {MIN_CONTEXT})")
        return build_decoder(model_cfg, model_cfg.get("multimodal_cfg")
                             or multimodal_cfg(model_cfg, self.cfg.layers, self.cfg.heads))

    def needs(self) -> Needs:
        return Needs(image_tokens=True, text_tokens=True, images=True)

    def step(self, model, enc, batch):
        image_tokens = enc.image_tokens[:, 1:]                          # [B, K, W] patches, class token left out
        if not self.cfg.train_image:
            image_tokens = image_tokens.detach()
        logits = caption_logits(model.heads[self.name], image_tokens, enc.text_tokens)  # [B, L' - 1, V]
        return caption_outputs(logits, enc.text_ids[:, 1:], self.cfg.label_smoothing), []

    def bind(self, world, total_steps):
        self.world_size = world.world_size

    def loss(self, outputs, batch, step):
        loss = mean_over_tokens(outputs["caption_nll"], outputs["caption_tokens"], getattr(self, "world_size", 1))
        text = batch["text"]
        # a caption whose end of text sits in the context's last slot was probably cut by the tokenizer
        truncated = float((text.argmax(dim=-1) == text.shape[1] - 1).float().mean())
        return loss, {"caption_truncated": truncated}
