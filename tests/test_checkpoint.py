"""Checkpoints: atomic publication, keep-last pruning, --resume resolution, prefix-free weights, RNG round trip."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from pipeline.train.checkpoint import Checkpointer, clean_state_dict, rng_state, set_rng_state


def _write(ckpt: Checkpointer, step: int, ranks: int = 1) -> None:
    for rank in range(ranks):
        ckpt.write_rank_state(step, rank, {"rng": rng_state(), "loader": {"epoch": 0}})
    ckpt.write_main_state(step, {"w": torch.ones(2)}, {"optimizer": {}}, {"step": step})
    ckpt.publish(step)


def test_only_published_checkpoints_count_and_old_ones_are_pruned(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    assert ckpt.latest() is None and ckpt.resolve("auto") is None and ckpt.resolve(None) is None
    for step in (10, 20, 30):
        _write(ckpt, step)
    # An interrupted write (kill -9 before the rename) leaves a staging dir that is never picked.
    ckpt.write_rank_state(40, 0, {"rng": rng_state()})
    assert [p.name for p in ckpt.complete()] == ["step-00000020", "step-00000030"]
    assert ckpt.resolve("auto").name == "step-00000030"
    assert ckpt.resolve(str(tmp_path / "checkpoints/step-00000020")).name == "step-00000020"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve(str(tmp_path / "checkpoints/.tmp-step-00000040"))
    state = Checkpointer.load(ckpt.latest(), 0)
    assert state["trainer"]["step"] == 30 and torch.equal(state["model"]["w"], torch.ones(2))
    with pytest.raises(ValueError, match=r"rank-00001.pt is missing \(1 of 1 per-rank files\)"):
        Checkpointer.load(ckpt.latest(), 1)


def test_weights_of_a_compiled_prepared_model_are_prefix_free(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    wrapped = Accelerator(cpu=True).prepare(torch.compile(model))  # torch.compile wraps lazily: no compile here
    assert any(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.write_main_state(1, wrapped.state_dict(), {}, {"step": 1})
    assert set(load_file(ckpt.staging_dir(1) / "model.safetensors")) == {"0.weight", "0.bias"}
    assert set(clean_state_dict({"module._orig_mod.0.weight": torch.zeros(1)})) == {"0.weight"}


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
