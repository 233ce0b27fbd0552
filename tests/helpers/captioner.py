"""A micro model trained with objective.caption, its batches, and its open_clip CoCa export."""
from __future__ import annotations

import open_clip
import torch

import pipeline.artifacts.export as ex
from pipeline.models.caption_head import multimodal_cfg
from pipeline.models.model import build_model
from pipeline.objectives.combined import Objective
from pipeline.objectives.registry import ObjectiveConfig
from pipeline.train.distributed import World
from tests.helpers.micro_clip import MICRO_CFG

CAPTIONS = ["a photo of a shirt", "a dress on a hanger", "a bag", "a pair of black ankle boots"]


def micro_cfg() -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in MICRO_CFG.items()}


def batch_of(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = open_clip.SimpleTokenizer(context_length=16)((CAPTIONS * n)[:n])
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text": text}


def model_and_objective(seed: int = 0, **sections):
    cfg = ObjectiveConfig(**{"caption": {"weight": 2.0, "layers": 1, "heads": 2}, **sections})
    torch.manual_seed(seed)
    return build_model(micro_cfg(), cfg), Objective(cfg, World())


def coca_model_cfg() -> dict:
    """The micro config as a caption run records it (with the decoder's multimodal_cfg)."""
    cfg = micro_cfg()
    cfg["multimodal_cfg"] = multimodal_cfg(cfg, layers=1, heads=2)
    return cfg


def exported(tmp_path, steps: int = 30):
    """A micro model trained a little with contrastive + caption on 4 captions, and its open_clip export."""
    model, objective = model_and_objective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = objective.augment(batch_of(), 0)
    for step in range(steps):
        total, _, _ = objective(model(batch), batch, step)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    model.eval()
    src = ex.Source(clip=ex.clip_state(model.state_dict()), heads=ex.heads_state(model.state_dict()),
                    model_cfg=coca_model_cfg())
    ex.export(src, "open_clip", tmp_path / "coca")
    return model, batch, tmp_path / "coca"
