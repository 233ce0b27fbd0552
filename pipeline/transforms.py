"""Image transforms compatible with open_clip's preprocess, and text tokenisation."""
from __future__ import annotations

import open_clip
from torchvision import transforms as T

from pipeline.models.towers import image_mean_std


def image_transform(model_cfg: dict, is_train: bool) -> T.Compose:
    """open_clip's train (random resized crop) or eval (resize + centre crop) preprocess for this model."""
    mean, std = image_mean_std(model_cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    return open_clip.image_transform(size, is_train=is_train, mean=mean, std=std)


def preprocess_cfg(model_cfg: dict) -> dict:
    """The preprocess settings open_clip's `local-dir:` loader reads from open_clip_config.json."""
    mean, std = image_mean_std(model_cfg)
    return {"size": model_cfg["vision_cfg"]["image_size"], "mode": "RGB", "mean": list(mean), "std": list(std),
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
