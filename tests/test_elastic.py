"""Elastic resume of the data order through the real loader: every rank of a topology is a TrainStream reading
real shards (ranks simulated in one process; tests/test_train_elastic.py runs real processes). A run stops
part-way through an epoch, resumes on another number of ranks and workers, maybe again, and the keys read
before and after are the epoch's samples exactly once, less one tail that fills no global batch."""
from __future__ import annotations

import open_clip
import pytest

from pipeline.config import DataConfig
from pipeline.data.loader import TrainStream
from pipeline.train.distributed import World
from tests.helpers.synthetic_shards import make_shards

BATCH = 4


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("elastic"), [37, 50, 23, 41, 30, 44, 29, 46, 35, 40, 33, 27])


def _ranks(spec: str, world_size: int, workers: int, mode: str = "exact") -> list[TrainStream]:
    cfg = DataConfig(train_shards=spec, batch_size=BATCH, num_workers=workers, shuffle_buffer=16, mode=mode)
    transform = open_clip.image_transform(32, is_train=False)
    return [TrainStream(cfg, World(rank=r, world_size=world_size), transform, open_clip.get_tokenizer("ViT-B-32"),
                        with_keys=True) for r in range(world_size)]


def _take(ranks: list[TrainStream], batches: int) -> list[str]:
    keys = []
    for stream in ranks:
        it = iter(stream)
        keys += [k for _ in range(batches) for k in next(it)["__key__"]]
        stream.close()
    return keys


@pytest.mark.parametrize("plan", [
    [(4, 2, 3), (2, 1, None)],                 # 4 ranks x 2 workers -> 2 x 1
    [(2, 2, 5), (3, 2, 4), (4, 1, None)],      # grow, then grow again inside the same epoch
])
def test_the_rest_of_the_epoch_is_read_once_on_another_topology(spec, plan):
    total = sum([37, 50, 23, 41, 30, 44, 29, 46, 35, 40, 33, 27])
    states, read = None, []
    for world_size, workers, batches in plan:
        ranks = _ranks(spec, world_size, workers)
        if states is not None:
            for stream in ranks:
                stream.load_elastic(states)
        assert all(s.epoch == 0 for s in ranks)
        count = ranks[0].batches_per_epoch if batches is None else batches
        read += _take(ranks, count)
        states = [s.state_dict() for s in ranks]
    assert len(read) == len(set(read)), "a sample was read twice"
    assert total - len(read) < BATCH * plan[-1][0], (total, len(read))
    # resumed on the last topology, the epoch is complete; the next one starts whole
    last = _ranks(spec, plan[-1][0], plan[-1][1])
    for stream in last:
        stream.load_elastic(states)
    assert all(s.consumed == s.batches_per_epoch for s in last)
    it = iter(last[0])
    next(it)
    assert (last[0].epoch, last[0].segment, last[0].segment_id) == (1, None, 0)
    last[0].close()


def test_resampled_mode_continues_with_new_draws_for_the_rest_of_the_virtual_epoch(spec):
    ranks = _ranks(spec, 2, 2, mode="resampled")
    per_rank = ranks[0].batches_per_epoch
    _take(ranks, 3)
    states = [s.state_dict() for s in ranks]
    moved = _ranks(spec, 4, 1, mode="resampled")
    for stream in moved:
        stream.load_elastic(states)
    # the rest of the virtual epoch: what 2 ranks had left, now over 4 ranks
    assert moved[0].batches_per_epoch == (per_rank - 3) * 2 * BATCH // (4 * BATCH)
    assert moved[0].segment_id == 1 and len(_take(moved, 1)) == 4 * BATCH


def test_same_topology_state_resumes_as_before(spec):
    ranks = _ranks(spec, 2, 2)
    _take(ranks, 2)
    state = ranks[1].state_dict()
    again = _ranks(spec, 2, 2)[1]
    again.load_state_dict(state)
    assert (again.consumed, again.segment, again.segment_id) == (2, None, 0)
    legacy = {k: v for k, v in state.items() if k not in ("segment", "segment_id")}  # written before segments
    legacy["signature"] = {k: v for k, v in state["signature"].items()
                           if k not in ("shuffle_buffer", "epoch_samples", "num_shards", "sizes_digest")}
    old = _ranks(spec, 2, 2)[1]
    old.load_state_dict(legacy)
    assert (old.consumed, old.segment) == (2, None)
