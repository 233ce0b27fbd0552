"""LiT locks (Zhai et al. 2022) with open_clip's meanings: locked parameters get no gradient (so no optimizer state
and no DDP gradient sync: both only see parameters that require one), and a fully locked tower runs in eval mode.
"""
from __future__ import annotations

import types

import open_clip
import torch
from torch import nn

from pipeline.models.config import ModelConfig


def apply_locks(clip: nn.Module, cfg: ModelConfig) -> None:
    """open_clip's tower locks with open_clip's meanings; a fully locked tower is kept in eval mode (as LiT runs
    it: dropout off, batch-norm statistics frozen), whatever train() the loop calls."""
    if cfg.lock_image:
        groups = image_lock_groups(clip)
        if groups is not None and cfg.lock_image_unlocked_groups >= groups:
            raise ValueError(f"config key 'model.lock_image_unlocked_groups': {cfg.lock_image_unlocked_groups} "
                             f"unlocks every one of the image tower's {groups} groups (nothing stays locked)")
        clip.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                              freeze_bn_stats=cfg.lock_image_freeze_norm)
        if cfg.lock_image_unlocked_groups == 0:
            keep_eval(clip.visual)
    if cfg.lock_text:
        lock_text(clip, cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_norm)
    if cfg.lock_text_cache:
        if isinstance(clip, open_clip.CLIP) or any(p.requires_grad for p in clip.text.transformer.parameters()):
            raise ValueError("config key 'model.lock_text_cache': needs a fully locked HF text tower "
                             "(model.text_hf with model.lock_text, no unlocked layers, frozen norms)")
        cache_locked_text(clip, cfg.lock_text_cache)


def image_lock_groups(clip: nn.Module) -> int | None:
    """How many groups open_clip's ViT lock knows: embeddings, each block but the last, last block + ln_post,
    projection (None for towers whose grouping open_clip does not expose)."""
    visual = clip.visual
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        return len(visual.transformer.resblocks) + 2
    return None


def lock_text(clip: nn.Module, unlocked_layers: int, freeze_norm: bool) -> None:
    """Freezes the text tower but its last `unlocked_layers` groups (open_clip's grouping: embeddings, each block,
    the last block with the final norm, then the projection for open_clip's text transformer; embeddings, each
    layer for an HF tower, whose projection always trains). Without freeze_norm the norms keep training."""
    if isinstance(clip, open_clip.CLIP):
        groups = len(clip.transformer.resblocks) + 2
        if unlocked_layers >= groups:
            raise ValueError(f"config key 'model.lock_text_unlocked_layers': {unlocked_layers} unlocks every one "
                             f"of the text tower's {groups} groups (nothing stays locked)")
        open_clip.transformer.lock_text_tower(clip, unlocked_layers)
        trunk, tower = clip.transformer, [clip.token_embedding, clip.transformer, clip.ln_final]
    else:
        trunk = clip.text.transformer
        hf_cfg = open_clip.hf_configs.arch_dict[clip.text.config.model_type]["config_names"]
        encoder = getattr(trunk, "encoder", trunk)
        layers = list(getattr(encoder, hf_cfg.get("layer_attr", "layer")))
        embeddings = getattr(trunk, hf_cfg.get("token_embeddings_attr", "embeddings"))
        groups = [embeddings, *layers]
        if unlocked_layers > len(groups):
            raise ValueError(f"config key 'model.lock_text_unlocked_layers': {unlocked_layers} exceeds the HF text "
                             f"tower's {len(groups)} groups (embeddings + {len(layers)} layers)")
        trunk.requires_grad_(False)
        for group in groups[len(groups) - unlocked_layers:]:
            group.requires_grad_(True)
        tower = [trunk]
    if not freeze_norm:
        for module in tower:
            for m in module.modules():
                if isinstance(m, nn.LayerNorm):
                    m.requires_grad_(True)
    if not any(p.requires_grad for m in tower for p in m.parameters()):
        keep_eval(trunk)


def cache_locked_text(clip: nn.Module, max_entries: int) -> None:
    """Remembers the pooled features of a fully locked, eval-mode HF text trunk per caption (its token ids), so a
    caption seen before costs a dictionary lookup instead of a transformer pass; the projection above still trains.
    LiT precomputes a locked tower's embeddings for the same reason. Up to `max_entries` captions are kept (the
    first ones seen): it pays off where captions repeat (templates, class names), not on unique web captions."""
    text = clip.text
    cache: dict[bytes, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, L] token ids, padded with pad_token_id
        keys = [row.tobytes() for row in x.cpu().numpy()]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)                                          # each distinct caption once
        missing = [i for k, i in first.items() if k not in cache]
        if missing:
            with torch.no_grad():
                ids = x[missing]                                            # [M, L]
                mask = (ids != self.config.pad_token_id).long()
                pooled = self.pooler(self.transformer(input_ids=ids, attention_mask=mask), mask)  # [M, W]
            fresh = dict(zip((keys[i] for i in missing), pooled))
            for k, v in fresh.items():
                if len(cache) < max_entries:
                    cache[k] = v
        else:
            fresh = {}
        pooled = torch.stack([cache[k] if k in cache else fresh[k] for k in keys])  # [B, W]
        return self.proj(pooled)                                            # [B, E]

    text.forward = types.MethodType(forward, text)


def keep_eval(module: nn.Module) -> None:
    """Puts `module` in eval mode for good: its train(True) becomes train(False). Module.train(mode) calls each
    child's train(mode), so the loop's model.train() reaches this override and leaves the locked tower alone."""
    module.eval()
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)


def check_trainable(model: nn.Module) -> None:
    """Fails when the locks leave nothing to train but the temperature (and SigLIP's bias)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "logit_" not in n]
    if not trainable:
        raise ValueError("config keys 'model.lock_image' / 'model.lock_text': every tower parameter is locked "
                         "and no head trains: nothing to train (unlock groups with "
                         "model.lock_image_unlocked_groups / model.lock_text_unlocked_layers, or lock one tower)")
