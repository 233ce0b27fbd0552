"""Image-text matching (ITM; ALBEF, BLIP, FLAVA): a small fusion encoder classifies (image, caption) pairs as matched
or not. Each sample gives three pairs: its own (matched), its caption with a hard negative image, its image with a
hard negative caption. Negatives are drawn from the batch's contrastive similarities, gathered across ranks as the
contrastive loss gathers them: the more similar a wrong partner, the likelier it is drawn (ALBEF's sampling); a
partner with the very same caption is not a wrong one and is not drawn.

The fusion head runs inside the model's forward (so that DDP and FSDP see its parameters); the batch carries this
process's place in the world (`itm_world`, from augment), through which the unit gathers the other ranks' tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.options import require
from pipeline.losses.contrastive import gather_with_grad
from pipeline.models.encoding import Needs
from pipeline.models.itm_head import ItmHead
from pipeline.models.towers import check_text_transformer, check_vit
from pipeline.objectives.base import Unit


@dataclass(frozen=True)
class ItmConfig:
    weight: float = 0.0
    """Weight of image-text matching: a fusion encoder (text tokens cross-attending to image tokens) classifies each
    sample's matched pair and two hard negative pairs; 0 disables it."""
    layers: int = 2
    """Blocks of the fusion encoder (each: self-attention over the caption, cross-attention to the image, MLP)."""
    width: int = 128
    """Width of the fusion encoder."""
    heads: int = 4
    """Attention heads of the fusion encoder."""

    def __post_init__(self):
        for name in ("layers", "width", "heads"):
            require(getattr(self, name) > 0, f"objective.itm.{name}", "must be positive")
        require(self.width % self.heads == 0, "objective.itm.width", "must be a multiple of objective.itm.heads")


def hard_negatives(sim: torch.Tensor, own: torch.Tensor, gumbel: torch.Tensor,
                   same: torch.Tensor | None = None) -> torch.Tensor:
    """For each row of sim [B, N] (scaled similarities to the N gathered candidates), a candidate other than the
    row's own (`own` [B] column indices) drawn with probability softmax(sim) over the others: Gumbel-max sampling
    with the noise `gumbel` [B, N] (what torch.multinomial on those weights draws, with the noise explicit).

    `same` [B, N]: candidates whose caption is the row's caption. Their pair with the row is a matched pair (a
    template caption, or web alt-text such as "image"), so labelling it "not matched" would teach the head noise;
    they are skipped like the row's own, unless nothing else is left (BLIP skips other captions of the same image
    the same way)."""
    skip = F.one_hot(own, sim.shape[1]).bool()                                                # [B, N]
    if same is not None:
        wider = skip | same
        skip = torch.where(wider.all(dim=1, keepdim=True), skip, wider)
    scores = sim.masked_fill(skip, float("-inf")) + gumbel                                  # [B, N]
    return scores.argmax(dim=1)                                                             # [B]


def gumbel_noise(shape: tuple[int, int], device) -> torch.Tensor:
    u = torch.rand(shape, device=device).clamp_(1e-20, 1.0)
    return -torch.log(-torch.log(u))


def _gather(x: torch.Tensor, world_size: int, grad: bool) -> torch.Tensor:
    if world_size == 1:
        return x
    if grad:
        return gather_with_grad(x, world_size)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def itm_logits(head: ItmHead, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_ids: torch.Tensor,
               image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
               rank: int = 0, world_size: int = 1, gumbel: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, 3, 2] of this rank's B samples' pairs: (own image, own caption), (negative image, own caption),
    (own image, negative caption). Tokens: image [B, T, Wi], text [B, L, Wt] with ids [B, L], equal shapes on every
    rank; features [B, E] L2-normalised. `gumbel` [2, B, N]: the sampling noise (drawn when None)."""
    B = image_features.shape[0]
    with torch.no_grad():
        all_images = _gather(image_features.detach(), world_size, grad=False)         # [N, E]
        all_texts = _gather(text_features.detach(), world_size, grad=False)           # [N, E]
        all_text_ids = _gather(text_ids, world_size, grad=False)                      # [N, L]
        caption = torch.unique(all_text_ids, dim=0, return_inverse=True)[1]           # [N] equal ids, equal number
        scale = logit_scale.detach()
        own = torch.arange(B, device=image_features.device) + rank * B                # [B]
        same = caption[own][:, None] == caption[None, :]                              # [B, N]
        if gumbel is None:
            gumbel = gumbel_noise((2, B, all_images.shape[0]), image_features.device)
        negative_image = hard_negatives(scale * text_features @ all_images.t(), own, gumbel[0], same)  # [B]
        negative_text = hard_negatives(scale * image_features @ all_texts.t(), own, gumbel[1], same)   # [B]
    # the negatives' tokens may live on other ranks: gathered with their gradient, which flows back to the owner
    all_image_tokens = _gather(image_tokens, world_size, grad=True)                   # [N, T, Wi]
    all_text_tokens = _gather(text_tokens, world_size, grad=True)                     # [N, L, Wt]
    images = torch.cat([image_tokens, all_image_tokens[negative_image], image_tokens])  # [3B, T, Wi]
    texts = torch.cat([text_tokens, text_tokens, all_text_tokens[negative_text]])     # [3B, L, Wt]
    ids = torch.cat([text_ids, text_ids, all_text_ids[negative_text]])                # [3B, L]
    return head(texts, ids, images).view(3, B, 2).transpose(0, 1)                     # [B, 3, 2]


class Itm(Unit):
    name, Config = "itm", ItmConfig
    video = False

    def card(self) -> str:
        return (f"image-text matching: {self.cfg.layers} x {self.cfg.width} fusion encoder, hard negatives from the "
                f"contrastive similarities (weight {self.weight:g})")

    def head(self, clip, model_cfg):
        check_vit(clip, "objective.itm")
        check_text_transformer(clip, "objective.itm")
        return ItmHead(clip.transformer.width, clip.visual.transformer.width, self.cfg.width, self.cfg.layers,
                       self.cfg.heads)

    def needs(self) -> Needs:
        return Needs(image_tokens=True, text_tokens=True, images=True)

    def step(self, model, enc, batch):
        rank, world_size = batch.get("itm_world", (0, 1))
        text_tokens, text_ids = enc.text_tokens, enc.text_ids                         # [B, L', Wt], [B, L']
        if world_size > 1 and text_ids.shape[1] < enc.text.shape[1]:
            # ranks trim their captions to different lengths: pad to the context, equal everywhere, to gather
            pad = enc.text.shape[1] - text_ids.shape[1]
            text_tokens, text_ids = F.pad(text_tokens, (0, 0, 0, pad)), F.pad(text_ids, (0, pad))
        logit_scale = model.clip.logit_scale.exp().clamp(max=model.max_logit_scale)
        logits = itm_logits(model.heads[self.name], enc.image_tokens, text_tokens, text_ids, enc.image_features,
                            enc.text_features, logit_scale, rank, world_size)
        return {"itm_logits": logits}, []

    def bind(self, world, total_steps):
        self.world = (world.rank, world.world_size)

    def augment(self, batch, step):
        return {"itm_world": self.world}

    def loss(self, outputs, batch, step):
        logits = outputs["itm_logits"]                                                # [B, 3, 2]
        labels = torch.tensor([1, 0, 0], device=logits.device).expand(logits.shape[0], 3)  # [B, 3]: matched first
        accuracy = float((logits.argmax(-1) == labels).float().mean())
        logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))  # [3B, 2], >= fp32
        return F.cross_entropy(logits, labels.flatten()), {"itm_accuracy": accuracy}
