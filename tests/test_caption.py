"""Captioning (pipeline/objectives/caption.py): the loss trains, composes with the other units on one encoding,
and its config errors name their keys."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.models.model import build_model
from pipeline.objectives.registry import ObjectiveConfig
from tests.helpers.captioner import batch_of, micro_cfg, model_and_objective

torch.set_num_threads(1)


def test_caption_loss_decreases_in_a_few_steps():
    model, objective = model_and_objective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = objective.augment(batch_of(), 0)
    seen = []
    for step in range(12):
        total, losses, report = objective(model(batch), batch, step)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        seen.append(float(losses["caption"]) / 2.0)
    assert seen[-1] < 0.5 * seen[0], seen
    assert 0 <= report["caption_truncated"] <= 1


def count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("sections", [
    {},
    {"flip": {"mask_ratio": 0.5}, "mae": {"weight": 0.5}, "mlm": {"weight": 0.5}},
    {"contrastive": {"weight": 0.0}, "siglip": {"weight": 1.0}},
])
def test_caption_composes_with_other_objectives_on_one_encoding(sections):
    model, objective = model_and_objective(**sections)
    image_passes, text_passes = count_calls(model.clip.visual.transformer), count_calls(model.clip.transformer)
    batch = objective.augment(batch_of(), 0)
    out = model(batch)
    total, losses, _ = objective(out, batch, 0)
    total.backward()
    assert image_passes == [1] and text_passes == [1]             # one image pass, one (batched) text pass
    assert "caption" in losses and len(losses) >= 2
    assert model.heads["caption"].text_projection.grad is not None
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0
    if sections.get("flip"):
        assert out["caption_nll"].shape == (4,) and out["image_keep"].shape[1] == 8  # half the 16 patches


@pytest.mark.parametrize("overrides, key", [
    (["objective.caption.weight=1.0", "model.lock_image=true"], "objective.caption.train_image"),
    (["objective.caption.weight=1.0", "objective.caption.label_smoothing=1.5"], "objective.caption.label_smoothing"),
    (["objective.caption.weight=1.0", "objective.caption.layers=0"], "objective.caption.layers"),
])
def test_config_errors_name_their_keys(overrides, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        load_config(None, overrides)


def test_a_locked_image_tower_may_caption_from_detached_tokens():
    load_config(None, ["objective.caption.weight=1.0", "model.lock_image=true", "objective.caption.train_image=false"])


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["vision_cfg"].update(width=96), "image width 96 and text width 64 differ"),
    (lambda c: c["text_cfg"].update(context_length=6), "text context of 6 tokens is too short"),
    (lambda c: c["text_cfg"].update(no_causal_mask=True), "needs a causal text tower"),
])
def test_towers_without_what_the_decoder_needs_are_refused(edit, match):
    cfg = micro_cfg()
    edit(cfg)
    with pytest.raises(ValueError, match=match) as e:
        build_model(cfg, ObjectiveConfig(caption={"weight": 1.0, "heads": 2}))
    assert "objective.caption" in str(e.value)
