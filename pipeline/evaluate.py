"""Zero-shot classification on labelled shards (class names x prompt templates)."""
from __future__ import annotations

from typing import Callable

import torch
import webdataset as wds
from torch import nn

from pipeline.data import IMAGE_KEYS, expand_shards


def labelled_images(shards: str, transform: Callable, batch_size: int, num_workers: int = 0,
                    max_samples: int = 0):
    """Batches of (images [B, 3, H, W], labels [B]) in shard order; no shuffling."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand_shards(shards)),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.decode("pil"),
        wds.to_tuple(IMAGE_KEYS, "cls"),
        wds.map_tuple(transform, int),
        wds.batched(batch_size, partial=True),
    )
    seen = 0
    for images, labels in wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers):
        if max_samples and seen >= max_samples:
            break
        yield images, torch.as_tensor(labels)
        seen += len(labels)


@torch.no_grad()
def class_embeddings(clip: nn.Module, tokenize: Callable, classnames, templates, device) -> torch.Tensor:
    """[C, D]: each class's normalised mean embedding over the templates."""
    weights = []
    for name in classnames:
        texts = tokenize([t.format(name) for t in templates]).to(device)
        emb = clip.encode_text(texts, normalize=True).mean(dim=0)
        weights.append(emb / emb.norm())
    return torch.stack(weights)


@torch.no_grad()
def zero_shot(clip: nn.Module, tokenize: Callable, shards: str, classnames, templates, transform: Callable,
              batch_size: int = 512, device: str | torch.device = "cpu", max_samples: int = 0) -> dict:
    """Top-1 / top-5 accuracy and per-class accuracy of zero-shot classification."""
    was_training = clip.training
    clip.eval()
    weights = class_embeddings(clip, tokenize, classnames, templates, device)  # [C, D]
    num_classes = len(classnames)
    correct1 = correct5 = total = 0
    per_class_hits = torch.zeros(num_classes)
    per_class_total = torch.zeros(num_classes)
    for images, labels in labelled_images(shards, transform, batch_size, max_samples=max_samples):
        feats = clip.encode_image(images.to(device), normalize=True)  # [B, D]
        logits = feats @ weights.T  # [B, C]
        top = logits.topk(min(5, num_classes), dim=1).indices.cpu()  # [B, k]
        hit1 = top[:, 0] == labels
        correct1 += hit1.sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        total += len(labels)
        per_class_total += torch.bincount(labels, minlength=num_classes).float()
        per_class_hits += torch.bincount(labels[hit1], minlength=num_classes).float()
    clip.train(was_training)
    if total == 0:
        raise ValueError(f"no labelled samples (image + cls) found in {shards}")
    per_class = (per_class_hits / per_class_total.clamp(min=1)).tolist()
    return {"top1": correct1 / total, "top5": correct5 / total, "num_samples": total,
            "per_class": dict(zip(classnames, per_class))}
