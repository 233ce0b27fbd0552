"""A CLIP small enough for a 2-core test, built by the real model code, and random batches for it."""
from __future__ import annotations

import torch

MICRO_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def micro_batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g),
            "text": torch.randint(1, 49407, (n, 16), generator=g)}
