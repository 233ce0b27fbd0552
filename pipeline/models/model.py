"""The trained module: the open_clip towers plus the heads of the enabled objectives.

Only `clip` is exported in open_clip format; heads (decoders, discriminators) are training-time extras.
"""
from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ObjectiveConfig
from pipeline.models.discriminator import ModalityDiscriminator
from pipeline.models.fusion import FusionAutoencoder
from pipeline.models.mae_decoder import MaeDecoder
from pipeline.models.masking import random_keep
from pipeline.models.mlm_head import MlmHead
from pipeline.models.towers import (build_clip, check_text_transformer, check_vit, encode_image_tokens,
                                    encode_text_packed, encode_text_tokens, padding_is_inert,
                                    trimmed_text_length)

# SigLIP's initialisation (Zhai et al. 2023): t' = log 10, b = -10, so that the start is not swamped by negatives.
SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS = math.log(10), -10.0


class PlaitModel(nn.Module):
    """forward(batch) -> dict: image_features/text_features [B, D] (L2-normalised; a video batch's `frames`
    [B, T, 3, H, W] are encoded frame by frame and mean-pooled), logit_scale [] (exp'd,
    clamped), logit_bias [] (SigLIP), and per enabled head its tensors (see each head). Masks come in the batch
    from Objective.augment: image_mask_ratio (FLIP/MAE), mlm_input/mlm_mask_token/mlm_labels (MLM),
    adversarial_scale (gradient reversal ramp)."""

    def __init__(self, clip: nn.Module, heads: dict[str, nn.Module] | None = None, max_logit_scale: float = 100.0,
                 uses_logit_scale: bool = True, trim_text: bool = True, pack_text: bool = True):
        super().__init__()
        self.trim_text = trim_text  # run the text tower on the batch's caption length, not the context length
        self.pack_text = pack_text  # and pack the trimmed captions into shared rows (pipeline.models.packing)
        self.clip = clip
        self.heads = nn.ModuleDict(heads or {})
        self.max_logit_scale = max_logit_scale
        self.uses_logit_scale = uses_logit_scale

    def forward(self, batch: dict | torch.Tensor, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not isinstance(batch, dict):  # model(image, text): the loop's call form before the batch contract
            batch = {"image": batch, "text": text}
        text = batch["text"]                                        # [B, L]
        clip, heads = self.clip, self.heads
        length = trimmed_text_length(clip, text) if self.trim_text else text.shape[1]  # L' <= L: one host sync
        out: dict[str, torch.Tensor] = {}
        frames = batch.get("frames") if "image" not in batch else None  # video: [B, T, 3, H, W]
        if frames is not None:
            if "mae" in heads or "autoencoder" in heads:
                raise ValueError("video batches (data.video_frames > 0) train contrastive, SigLIP, FLIP, MLM and "
                                 "adversarial objectives; objective.mae and objective.autoencoder need images")
            image = frames.flatten(0, 1)                            # [B * T, 3, H, W]
        else:
            image = batch["image"]                                  # [B, 3, H, W]

        ratio = float(batch.get("image_mask_ratio", 0.0))
        keep = None
        if ratio > 0:
            grid = clip.visual.grid_size
            keep = random_keep(image.shape[0], grid[0] * grid[1], ratio, device=image.device)  # [B, K]
            if frames is None:
                out["image_keep"] = keep
        attention_fusion = "autoencoder" in heads and heads["autoencoder"].fusion_type == "attention"
        if keep is not None or attention_fusion:
            image_embed, image_tokens = encode_image_tokens(clip.visual, image, keep)  # [B, E], [B, 1 + K, W]
        else:
            image_embed, image_tokens = clip.encode_image(image), None
        mlm_on = "mlm" in heads and "mlm_input" in batch
        if attention_fusion or self.trim_text or mlm_on:
            # cross-attention fusion reads every text position: the full length
            pack = self.trim_text and self.pack_text and not attention_fusion and padding_is_inert(clip)
            text_embed, text_tokens, mlm = self._encode_text(batch, text if attention_fusion else text[:, :length],
                                                             mlm_on, pack)  # [B, E], [B, L, W]
            if not attention_fusion:
                text_tokens = None
        else:
            text_embed, text_tokens, mlm = clip.encode_text(text), None, {}

        if frames is not None:
            # A clip's embedding is the mean of its frames' embeddings (CLIP4Clip's parameter-free "meanP").
            image_embed = image_embed.view(frames.shape[0], frames.shape[1], -1).mean(dim=1)  # [B, E]
        out["image_features"] = F.normalize(image_embed, dim=-1)
        out["text_features"] = F.normalize(text_embed, dim=-1)
        out["logit_scale"] = clip.logit_scale.exp().clamp(max=self.max_logit_scale)
        if clip.logit_bias is not None:
            out["logit_bias"] = clip.logit_bias

        unused = [] if self.uses_logit_scale else [clip.logit_scale]
        if "mae" in heads:
            if keep is not None:
                out.update(heads["mae"](image_tokens, keep, image))
            else:  # FLIP's unmasked phase: nothing to reconstruct
                unused.append(heads["mae"])
        if "mlm" in heads:
            out.update(mlm)
            if not mlm_on:
                unused.append(heads["mlm"])
        if "autoencoder" in heads:
            out.update(heads["autoencoder"](text_embed, image_embed, image, text, clip.token_embedding,
                                            image_tokens=image_tokens, text_tokens=text_tokens))
        if "adversarial" in heads:
            turn = batch.get("adversarial_turn", "reversal")
            out.update(heads["adversarial"](out["image_features"], out["text_features"],
                                            float(batch.get("adversarial_scale", 1.0)), turn))
            if turn == "towers":  # the frozen discriminator's parameters take no part in this step's loss
                unused.append(heads["adversarial"])
        if unused:
            # Parameters left out of this step still get a (zero) gradient: DDP without find_unused_parameters
            # fails on parameters that take no part in the loss.
            out["unused"] = sum(p.sum() * 0.0 for m in unused for p in ([m] if isinstance(m, nn.Parameter)
                                                                         else m.parameters()))
        return out

    def _encode_text(self, batch: dict, text: torch.Tensor, mlm_on: bool, pack: bool):
        """The contrastive text pass over text [B, L] -> (pooled [B, E], tokens [B, L, W], MLM outputs).

        With MLM on, its bidirectional pass runs batched with the contrastive one: one token-embedding lookup for
        every use (the contrastive ids, the MLM ids, the sampled output rows) and one tower pass over 2B rows.
        Run separately, each lookup's backward wrote its own dense [V, W] embedding gradient (19 MB at 49,408 x 96)
        and every tower weight got two gradients to add: a third of MLM's step time on the 3-layer fmnist-vit56.
        """
        clip = self.clip
        encode = encode_text_packed if pack else encode_text_tokens
        if not mlm_on:
            return (*encode(clip, text), {})
        head = self.heads["mlm"]
        B, L = text.shape
        # the cut to L drops only padding keys, which the bidirectional pass masks anyway
        ids, labels, mask_token = (batch[k][:, :L] for k in ("mlm_input", "mlm_labels", "mlm_mask_token"))  # [B, L]
        chosen = labels >= 0                                             # [B, L]
        candidates, targets = head.output_ids(labels[chosen])            # [C] or None, [M]
        lookup = [text.flatten(), ids.flatten()] + ([] if candidates is None else [candidates])
        rows = clip.token_embedding(torch.cat(lookup))                   # [2BL (+ C), W]
        embeddings = torch.cat([rows[:B * L], head.mask(rows[B * L:2 * B * L].view(B, L, -1), mask_token)
                                .flatten(0, 1)]).view(2 * B, L, -1)       # [2B, L, W]
        bidirectional = torch.arange(2 * B, device=text.device) >= B     # [2B]: the MLM half
        # both halves pool and mask padding by `text`: the MLM input's random replacements are all below EOT's id
        pooled, tokens = encode(clip, torch.cat([text, text]), embeddings, bidirectional)
        output_rows = clip.token_embedding.weight if candidates is None else rows[2 * B * L:]  # [V or C, W]
        logits = head(tokens[B:][chosen], output_rows, candidates)       # [M, V or C]
        return pooled[:B], tokens[:B], {"mlm_logits": logits, "mlm_targets": targets}


def build_model(model_cfg: dict, objective: ObjectiveConfig) -> PlaitModel:
    """The towers from an open_clip model config, with the heads `objective` asks for.

    With SigLIP enabled, `init_logit_bias` (and SigLIP's initial scale) are written into `model_cfg` itself,
    in place, because open_clip can load a checkpoint with a logit bias only when its config declares one.
    """
    if objective.siglip and "init_logit_bias" not in model_cfg:
        model_cfg["init_logit_bias"] = SIGLIP_INIT_LOGIT_BIAS
        if not objective.contrastive:
            model_cfg["init_logit_scale"] = SIGLIP_INIT_LOGIT_SCALE
    clip = build_clip(model_cfg)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    heads: dict[str, nn.Module] = {}
    if objective.flip_mask_ratio or objective.mae:
        check_vit(clip, "objective.flip_mask_ratio")
    if objective.mae:
        visual = clip.visual
        heads["mae"] = MaeDecoder(visual.transformer.width, visual.grid_size[0] * visual.grid_size[1],
                                  visual.patch_size[0], objective.mae_decoder_width, objective.mae_decoder_layers,
                                  heads=max(1, objective.mae_decoder_width // 32),
                                  cross=objective.mae_decoder == "cross")
    if objective.mlm:
        check_text_transformer(clip, "objective.mlm")
        heads["mlm"] = MlmHead(clip.transformer.width, clip.vocab_size, objective.mlm_candidates)
    if objective.autoencoder:
        # The text decoder's output layer is tied to the token embedding of open_clip's own text tower.
        check_text_transformer(clip, "objective.autoencoder")
        if objective.fusion == "attention":
            check_vit(clip, "objective.fusion = attention")
        image_size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
        image_width = clip.visual.transformer.width if objective.fusion == "attention" else 0
        heads["autoencoder"] = FusionAutoencoder(
            objective.fusion, model_cfg["embed_dim"], objective.fusion_dim, image_size, text.get("context_length", 77),
            image_width, clip.transformer.width, clip.vocab_size, objective.bilinear_rank,
            objective.autoencoder_text_candidates)
    if objective.adversarial:
        heads["adversarial"] = ModalityDiscriminator(model_cfg["embed_dim"], objective.adversarial_hidden)
    return PlaitModel(clip, heads, objective.max_logit_scale,
                      uses_logit_scale=bool(objective.contrastive or objective.siglip),
                      trim_text=isinstance(clip, open_clip.CLIP))  # an HF text tower has its own forward only
