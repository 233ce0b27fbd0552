"""The trained module: the open_clip towers plus the heads of the enabled objectives.

Only `clip` is exported in open_clip format; heads (decoders, discriminators) are training-time extras.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import open_clip
import torch
from torch import nn

from pipeline.models.encoding import Needs, encode_batch
from pipeline.models.towers import build_clip
from pipeline.objectives.registry import ObjectiveConfig, enabled_units

if TYPE_CHECKING:
    from pipeline.objectives.base import Unit


class PlaitModel(nn.Module):
    """forward(batch) -> dict: image_features/text_features [B, D] (L2-normalised; a video batch's `frames`
    [B, T, 3, H, W] are encoded frame by frame and mean-pooled), logit_scale [] (exp'd, clamped), logit_bias []
    (SigLIP), image_keep [B, K] (FLIP), and each enabled unit's head outputs (see pipeline/objectives/). Masks come
    in the batch from Objective.augment."""

    def __init__(self, clip: nn.Module, heads: dict[str, nn.Module] | None = None, max_logit_scale: float = 100.0,
                 uses_logit_scale: bool = True, trim_text: bool = True, pack_text: bool = True,
                 units: Sequence[Unit] = ()):
        super().__init__()
        self.trim_text = trim_text  # run the text tower on the batch's caption length, not the context length
        self.pack_text = pack_text  # and pack the trimmed captions into shared rows (pipeline.models.packing)
        self.clip = clip
        self.heads = nn.ModuleDict(heads or {})
        self.max_logit_scale = max_logit_scale
        self.uses_logit_scale = uses_logit_scale
        self.units = list(units)    # the enabled objective units' model side (plain objects: no parameters)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        needs = functools.reduce(operator.or_, (unit.needs() for unit in self.units), Needs())
        if "image" not in batch and "frames" in batch and needs.images:
            raise ValueError("video batches (data.video_frames > 0) train "
                             + ", ".join(u.name for u in self.units if u.video) + "; "
                             + " and ".join(f"objective.{u.name}" for u in self.units if not u.video) + " need images")
        sides = [p for p in (unit.side_pass(self, batch) for unit in self.units) if p is not None]
        assert len(sides) <= 1, "one side pass per step: the text tower batches one with the contrastive pass"
        enc = encode_batch(self.clip, batch, needs, sides[0] if sides else None, self.trim_text, self.pack_text)

        clip = self.clip
        out: dict[str, torch.Tensor] = {"image_features": enc.image_features, "text_features": enc.text_features,
                                        "logit_scale": clip.logit_scale.exp().clamp(max=self.max_logit_scale)}
        if clip.logit_bias is not None:
            out["logit_bias"] = clip.logit_bias
        if enc.keep is not None:
            out["image_keep"] = enc.keep
        unused = [] if self.uses_logit_scale else [clip.logit_scale]
        for unit in self.units:
            produced, idle = unit.step(self, enc, batch)
            out.update(produced)
            unused += idle
        if unused:
            # Parameters left out of this step still get a (zero) gradient: DDP without find_unused_parameters
            # fails on parameters that take no part in the loss.
            out["unused"] = sum(p.sum() * 0.0 for m in unused for p in ([m] if isinstance(m, nn.Parameter)
                                                                         else m.parameters()))
        return out


def build_model(model_cfg: dict, objective: ObjectiveConfig) -> PlaitModel:
    """The towers from an open_clip model config, with the heads of the objective units `objective` enables.

    A unit may edit `model_cfg` in place before the towers are built (SigLIP writes `init_logit_bias` and its
    initial scale), because open_clip can load a checkpoint with a logit bias only when its config declares one.
    """
    units = enabled_units(objective)
    for unit in units:
        unit.configure_towers(model_cfg)
    clip = build_clip(model_cfg)
    heads = {unit.name: head for unit in units if (head := unit.head(clip, model_cfg)) is not None}
    return PlaitModel(clip, heads, objective.max_logit_scale, uses_logit_scale=any(u.uses_logit_scale for u in units),
                      trim_text=isinstance(clip, open_clip.CLIP),  # an HF text tower has its own forward only
                      units=units)
