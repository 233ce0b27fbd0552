"""Registry of named model sizes, expressed as open_clip model configs (embed_dim, vision_cfg, text_cfg).

Any open_clip model name (ViT-B-32, ViT-S-32-alt, ...) is accepted too; the registry adds the small sizes
that CPU tests, the demo and the benchmarks need, so that every checkpoint stays loadable by open_clip.
"""
from __future__ import annotations

import copy

import open_clip

SIZES: dict[str, dict] = {
    # The demo's model: Fashion-MNIST is 28x28, so 7x7 patches give 16 tokens; 731 samples/s on 2 cores.
    "fmnist-vit": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 28, "layers": 4, "width": 128, "head_width": 32, "patch_size": 7},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
    },
    # The objectives ablation's model: Fashion-MNIST upsampled to 56 px, 7x7 patches -> 64 tokens, enough for
    # FLIP's masking to show its speed-up (at 28 px the 16 tokens leave the per-image overheads dominant). Image and
    # text compute per sample stand 14:1 (6 layers x 65 tokens against 2 x 14), as in ViT-B/16 with FLIP's 32-token
    # text (13.8:1), the regime FLIP was built for: with 3 image layers (7:1) the text tower, the 49k-row embedding's
    # update and the per-step costs, which masking cannot halve, were a third of the FLIP step.
    "fmnist-vit56": {
        "embed_dim": 96,
        "vision_cfg": {"image_size": 56, "layers": 6, "width": 96, "head_width": 32, "patch_size": 7},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2},
    },
    # The smallest sensible general model (7.3M parameters), for CPU tests.
    "tiny": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    },
    # The training-loop benchmark's size: ViT 4 layers width 256, text 4 layers width 256, 64 px.
    "tiny-bench": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
    },
}


def model_config(name: str) -> dict:
    """The open_clip model config of a registry size or an open_clip model name (a fresh copy)."""
    if name in SIZES:
        return copy.deepcopy(SIZES[name])
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = ", ".join(list(SIZES) + ["<any open_clip model, e.g. ViT-B-32>"])
        raise ValueError(f"config key 'model.name': unknown model {name!r}; known: {known}")
    return copy.deepcopy(cfg)
