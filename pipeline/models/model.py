"""The trained module: the open_clip towers plus the heads of the enabled objectives.

Only `clip` is exported in open_clip format; heads (decoders, discriminators) are training-time extras.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ObjectiveConfig
from pipeline.models.towers import build_clip


class PlaitModel(nn.Module):
    def __init__(self, clip: nn.Module, heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.clip = clip
        self.heads = nn.ModuleDict(heads or {})

    def forward(self, batch: dict | torch.Tensor, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # batch: {"image": [B, 3, H, W], "text": [B, L], ...} (or image, text positionally during the switch)
        # -> features [B, D] each, logit_scale [] (exp'd)
        if not isinstance(batch, dict):
            batch = {"image": batch, "text": text}
        out = self.clip(batch["image"], batch["text"])
        return {"image_features": out["image_features"], "text_features": out["text_features"],
                "logit_scale": out["logit_scale"], **({"logit_bias": out["logit_bias"]} if "logit_bias" in out else {})}


def build_model(model_cfg: dict, objective: ObjectiveConfig) -> PlaitModel:
    """The towers from an open_clip model config, with the heads `objective` asks for."""
    return PlaitModel(build_clip(model_cfg))
