"""Feature-cache accumulation gives the gradients of one big batch; plain loss-averaging accumulation does not."""
from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from pipeline.train.accumulate import concat_batches, forward_backward, split_batch
from pipeline.config import ObjectiveConfig
from pipeline.train.distributed import World
from pipeline.models.model import build_model
from pipeline.objectives.combined import Objective
from tests.helpers.micro_clip import MICRO_CFG, micro_batch
from tests.helpers.tolerance import assert_close, close

pytestmark = pytest.mark.numeric

def _grads(objective_cfg: ObjectiveConfig, accum_steps: int, batch: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_model(dict(MICRO_CFG), objective_cfg)
    objective = Objective(objective_cfg, World(), total_steps=10)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed + 1)  # the same mask/patch draws in every variant
    batch = objective.augment(batch, step=0)
    loss, losses, _ = forward_backward(model, objective, batch, 0, accum_steps, accelerator)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["loss"] = loss
    return grads


def _assert_close(a: dict, b: dict) -> None:
    # micro-batches trim the text to their own longest caption, so matmul shapes and fp32 rounding differ (in
    # float64 the two agree to 1e-14): 1e-4 of each gradient's magnitude
    assert a.keys() == b.keys()
    for name in a:
        assert_close(a[name], b[name], rtol=1e-4, name=name)


@pytest.mark.parametrize("objective_cfg", [
    ObjectiveConfig(contrastive=1.0),
    # FLIP masking draws random patches inside the model: both passes must draw the same ones.
    ObjectiveConfig(contrastive=1.0, flip_mask_ratio=0.5, mae=0.5, mae_decoder_width=32, mae_decoder_layers=1),
], ids=["clip", "flip-mae"])
def test_feature_cache_accumulation_equals_one_big_batch(objective_cfg):
    torch.set_num_threads(1)
    batch = micro_batch(16)
    whole = _grads(objective_cfg, 1, batch)
    accumulated = _grads(objective_cfg, 4, batch)
    _assert_close(whole, accumulated)


def test_loss_averaging_accumulation_is_not_equivalent():
    """What Accelerate's accumulate() computes (each micro-batch its own negatives) differs: the test above
    would catch a loop that fell back to it."""
    torch.set_num_threads(1)
    cfg = ObjectiveConfig(contrastive=1.0)
    batch = micro_batch(16)
    whole = _grads(cfg, 1, batch)
    torch.manual_seed(0)
    model = build_model(dict(MICRO_CFG), cfg)
    objective = Objective(cfg, World())
    for part in split_batch(batch, 4):
        loss, _, _ = objective(model(part), part, 0)
        (loss / 4).backward()
    name = "clip.visual.conv1.weight"
    assert not close(model.get_parameter(name).grad, whole[name], rtol=1e-2)


def test_split_and_concat_are_inverse():
    batch = {**micro_batch(12), "image_mask_ratio": 0.5}
    parts = split_batch(batch, 3)
    assert [p["image"].shape[0] for p in parts] == [4, 4, 4] and parts[1]["image_mask_ratio"] == 0.5
    joined = concat_batches(parts)
    assert torch.equal(joined["image"], batch["image"]) and torch.equal(joined["text"], batch["text"])
    with pytest.raises(ValueError, match="accum_steps=5"):
        split_batch(batch, 5)
