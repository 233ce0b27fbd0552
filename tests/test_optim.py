"""AdamW parameter groups and the pure LR schedule."""
from __future__ import annotations

import pytest

from pipeline.config import ObjectiveConfig, OptimConfig
from pipeline.models.model import build_model
from pipeline.train.optim import build_optimizer, check_schedule, lr_at, lr_factor, schedule_signature
from tests.helpers.micro_clip import MICRO_CFG


def test_weight_decay_skips_norms_biases_scales_and_embeddings():
    model = build_model(dict(MICRO_CFG), ObjectiveConfig(contrastive=1.0, siglip=1.0))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.2))
    decay_group, keep_group = optimizer.param_groups
    assert decay_group["weight_decay"] == 0.2 and keep_group["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay_group["params"]}
    kept = {names[id(p)] for p in keep_group["params"]}
    assert len(decayed) + len(kept) == len(names)
    for name in ("clip.logit_scale", "clip.logit_bias", "clip.positional_embedding", "clip.ln_final.weight",
                 "clip.visual.class_embedding", "clip.visual.ln_pre.bias", "clip.transformer.resblocks.0.ln_1.weight",
                 "clip.transformer.resblocks.0.attn.in_proj_bias"):
        assert name in kept, name
    for name in ("clip.visual.conv1.weight", "clip.transformer.resblocks.0.attn.in_proj_weight",
                 "clip.transformer.resblocks.0.mlp.c_fc.weight", "clip.text_projection", "clip.visual.proj"):
        assert name in decayed, name


def test_schedule_is_a_pure_function_of_the_step():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)           # warm-up starts above 0
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(55, cfg, 100) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert lr_at(100, cfg, 100) == pytest.approx(1e-4)         # floor at min_lr_ratio
    assert [lr_at(s, cfg, 100) for s in range(100)] == [lr_at(s, cfg, 100) for s in range(100)]
    constant = OptimConfig(warmup_steps=0, schedule="constant")
    assert {lr_factor(s, constant, 50) for s in range(50)} == {1.0}


def test_a_changed_schedule_is_refused_with_the_difference():
    saved = schedule_signature(OptimConfig(lr=1e-3), 1000)
    check_schedule(saved, schedule_signature(OptimConfig(lr=1e-3, weight_decay=0.5), 1000), "ck")  # not the LR
    with pytest.raises(ValueError, match=r"cannot resume ck: the LR schedule changed \(lr 0.001 -> 0.002\)"):
        check_schedule(saved, schedule_signature(OptimConfig(lr=2e-3), 1000), "ck")
