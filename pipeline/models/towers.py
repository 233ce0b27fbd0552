"""Builds the image and text towers as an open_clip model, so that checkpoints stay loadable by open_clip."""
from __future__ import annotations

import open_clip
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models.sizes import model_config


def resolved_model_config(cfg: ModelConfig) -> dict:
    """The open_clip model config this run trains, with plait's overrides applied (what the export writes)."""
    model_cfg = model_config(cfg.name)
    if cfg.patch_dropout:
        model_cfg["vision_cfg"]["patch_dropout"] = cfg.patch_dropout
    return model_cfg


def build_clip(model_cfg: dict) -> nn.Module:
    """An open_clip CLIP (or CustomTextCLIP for HF text towers) returning feature dicts; random weights."""
    model_cfg = dict(model_cfg)
    model_cfg.pop("custom_text", None)
    text_cfg = model_cfg.get("text_cfg", {})
    cls = open_clip.CustomTextCLIP if "hf_model_name" in text_cfg else open_clip.CLIP
    return cls(**model_cfg, output_dict=True)


def tokenizer_for(model_cfg: dict) -> open_clip.SimpleTokenizer:
    """open_clip's BPE tokenizer (vocabulary bundled in the wheel: no network) at the model's context length."""
    return open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"].get("context_length", 77))


def image_mean_std(model_cfg: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    vision = model_cfg["vision_cfg"]
    return (tuple(vision.get("image_mean", open_clip.OPENAI_DATASET_MEAN)),
            tuple(vision.get("image_std", open_clip.OPENAI_DATASET_STD)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def encode(clip: nn.Module, images: torch.Tensor | None = None, texts: torch.Tensor | None = None):
    """Normalised embeddings: images [N, 3, H, W] -> [N, D]; texts [N, L] -> [N, D]."""
    out = []
    if images is not None:
        out.append(clip.encode_image(images, normalize=True))
    if texts is not None:
        out.append(clip.encode_text(texts, normalize=True))
    return out[0] if len(out) == 1 else tuple(out)
