"""The slot assignment as pure functions, at cluster scale (64 nodes x 8 ranks x 8 workers), without processes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.data import sharding
from pipeline.data.sharding import Piece, Topology

BIG = Topology(num_nodes=64, ranks_per_node=8, workers_per_rank=8)


def _global_ids(sizes, pieces):
    """Pieces -> global sample ids (shard-major numbering of the unpermuted shard list)."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return np.concatenate([np.arange(starts[p.shard] + p.start, starts[p.shard] + p.stop) for p in pieces]
                          or [np.zeros(0, dtype=np.int64)])


@pytest.fixture(scope="module")
def big_sizes():
    rng = np.random.default_rng(7)
    return [int(x) for x in rng.integers(0, 400, size=5000)]  # uneven, some empty shards


def test_exact_epoch_at_scale_covers_every_sample_once_with_equal_batches(big_sizes):
    batch = 16
    assignment = sharding.exact_assignment(big_sizes, BIG, batch, seed=3, epoch=0)
    assert len(assignment) == BIG.num_slots == 4096
    ids = np.concatenate([_global_ids(big_sizes, p) for p in assignment])
    total = sum(big_sizes)
    assert len(np.unique(ids)) == len(ids), "a sample is read twice"
    assert total - len(ids) < batch * BIG.num_ranks, "more than the last partial global batch is left out"
    per_rank = sharding.batches_per_rank(total, batch, BIG)
    for rank in range(BIG.num_ranks):
        slots = assignment[rank * 8:(rank + 1) * 8]
        counts = [sum(len(p) for p in pieces) for pieces in slots]
        assert all(c % batch == 0 for c in counts)
        assert sum(counts) == per_rank * batch
        assert max(counts) - min(counts) <= batch
    # contiguity: node n's samples come from one contiguous run of the permuted shard list
    order = list(sharding.shard_order(len(big_sizes), 3, 0))
    node0 = [order.index(p.shard) for pieces in assignment[:64] for p in pieces]
    assert node0 == sorted(node0) and node0[-1] - node0[0] + 1 == len(set(node0))


def test_each_worker_computes_its_own_slot_alone(big_sizes):
    assignment = sharding.exact_assignment(big_sizes, BIG, 16, seed=3, epoch=1)
    for slot in (0, 1, 7, 8, 2047, 4095):
        assert sharding.exact_pieces(big_sizes, BIG, 16, 3, 1, slot) == assignment[slot]


def test_order_is_a_pure_function_of_seed_epoch_topology(big_sizes):
    a = sharding.exact_assignment(big_sizes, BIG, 16, seed=3, epoch=0)
    assert sharding.exact_assignment(big_sizes, BIG, 16, seed=3, epoch=0) == a
    assert sharding.exact_assignment(big_sizes, BIG, 16, seed=3, epoch=1) != a
    assert sharding.exact_assignment(big_sizes, BIG, 16, seed=4, epoch=0) != a
    other = Topology(32, 8, 16)  # same slot count, different split
    assert sharding.exact_assignment(big_sizes, other, 16, seed=3, epoch=0) != a


def test_fewer_shards_than_slots_is_an_error_naming_the_counts():
    with pytest.raises(ValueError, match=r"4096 shards, got 4000"):
        sharding.exact_assignment([10] * 4000, BIG, 4, seed=0, epoch=0)


def test_no_full_global_batch_is_an_error():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        sharding.batches_per_rank(100, 64, Topology(1, 2, 1))


def test_uneven_split_when_batches_do_not_divide_over_workers():
    topo = Topology(1, 2, 3)
    sizes = [7, 1, 30, 2, 11, 19, 5]  # 75 samples -> 75 // (4*2) = 9 batches per rank -> workers 3,3,3
    assignment = sharding.exact_assignment(sizes, topo, 4, seed=0, epoch=0)
    assert [sum(map(len, p)) // 4 for p in assignment] == [3, 3, 3, 3, 3, 3]
    topo = Topology(1, 1, 4)
    assert sharding.worker_batches(10, 4) == [3, 3, 2, 2]
    assignment = sharding.exact_assignment([20, 20, 2, 0], topo, 4, seed=0, epoch=0)
    assert [sum(map(len, p)) for p in assignment] == [12, 12, 8, 8]


def _round_robin(remaining: list[int], first: int) -> list[int]:
    """torch DataLoader's order: cycle over workers from `first`, skipping the exhausted ones."""
    out, left = [], list(remaining)
    for w in itertools.cycle(list(range(first, len(left))) + list(range(first))):
        if not any(left):
            return out
        if left[w]:
            out.append(w)
            left[w] -= 1


@pytest.mark.parametrize("per_rank,workers", [(10, 4), (9, 3), (3, 8), (1, 1), (17, 2)])
def test_rotation_continues_the_round_robin_after_resume(per_rank, workers):
    """Resuming after c batches: worker w of the new DataLoader plays slot (w + c) % workers and starts at that
    slot's consumed count; the resulting slot order equals the uninterrupted one."""
    quotas = sharding.worker_batches(per_rank, workers)
    full = _round_robin(quotas, 0)
    assert len(full) == per_rank
    for c in range(per_rank + 1):
        done = sharding.consumed_per_worker(c, per_rank, workers)
        assert done == [full[:c].count(k) for k in range(workers)]
        rotation = c % workers
        remaining_by_loader_worker = [quotas[(w + rotation) % workers] - done[(w + rotation) % workers]
                                      for w in range(workers)]
        resumed = [(w + rotation) % workers for w in _round_robin(remaining_by_loader_worker, 0)]
        assert full[:c] + resumed == full


def test_resampled_pieces_fill_quota_deterministically_with_mixing():
    sizes = [100] * 10 + [50] * 40  # dataset 0: 1000 samples in 10 shards, dataset 1: 2000 in 40
    probs = np.array([0.75 / 1000] * 10 + [0.25 / 2000] * 40)
    probs = probs / probs.sum()
    pieces = sharding.resampled_pieces(sizes, probs, seed=1, epoch=2, slot=5, quota=200_000)
    assert sum(map(len, pieces)) == 200_000
    assert pieces == sharding.resampled_pieces(sizes, probs, seed=1, epoch=2, slot=5, quota=200_000)
    assert pieces != sharding.resampled_pieces(sizes, probs, seed=1, epoch=2, slot=6, quota=200_000)
    share0 = sum(len(p) for p in pieces if p.shard < 10) / 200_000
    assert abs(share0 - 0.75) < 0.02


def test_skip_drops_a_prefix_across_pieces():
    pieces = [Piece(3, 5, 10), Piece(1, 0, 4), Piece(2, 2, 3)]
    assert sharding.skip(pieces, 0) == pieces
    assert sharding.skip(pieces, 7) == [Piece(1, 2, 4), Piece(2, 2, 3)]
    assert sharding.skip(pieces, 10) == []


# ------------------------------------------------------------------------------------------ elastic resume
def _slot_streams(segment, topo, batch, block, seed, epoch, segment_id):
    """What each slot reads of `segment`, in read order (epoch positions): an independent simulation of the
    loader (a slot's contiguous range of the segment, shuffled in blocks as its worker shuffles them)."""
    positions = np.concatenate([np.arange(a, b) for a, b in segment.tolist()])
    per_rank, ranges = sharding.segment_ranges(segment, topo, batch)
    streams = []
    for slot, (v0, v1) in enumerate(ranges.tolist()):
        mine = positions[v0:v1]
        blocks = [mine[i:i + block] for i in range(0, len(mine), block)]
        streams.append(np.concatenate([b[sharding.block_order(seed, epoch, segment_id, slot, n, len(b))]
                                       for n, b in enumerate(blocks)] or [np.zeros(0, np.int64)]))
    return per_rank, streams


def _consume(segment, topo, batch, block, seed, epoch, segment_id, consumed):
    per_rank, streams = _slot_streams(segment, topo, batch, block, seed, epoch, segment_id)
    done = sharding.consumed_per_worker(consumed, per_rank, topo.workers_per_rank)
    return np.concatenate([s[:done[slot % topo.workers_per_rank] * batch] for slot, s in enumerate(streams)])


@pytest.mark.parametrize("changes", [
    [(BIG, 0.5), (Topology(48, 8, 6), None)],                                   # shrink
    [(BIG, 0.3), (Topology(80, 8, 8), None)],                                   # grow
    [(BIG, 0.2), (Topology(48, 8, 6), 0.5), (Topology(80, 8, 8), 0.1), (Topology(64, 8, 8), None)],  # several
])
def test_elastic_resume_reads_every_sample_of_the_epoch_once(big_sizes, changes):
    """Each topology runs a fraction of its segment's batches, then the run resumes on the next one; the last
    reads its segment to the end. Together they read the epoch's samples exactly once, less one tail that
    fills no global batch of the last topology."""
    batch, block, seed, epoch = 16, 24, 3, 2
    total = sum(big_sizes)
    segment, read = sharding.whole_epoch(total), []
    for segment_id, (topo, fraction) in enumerate(changes):
        per_rank, _ = sharding.segment_ranges(segment, topo, batch)
        consumed = per_rank if fraction is None else int(per_rank * fraction)
        read.append(_consume(segment, topo, batch, block, seed, epoch, segment_id, consumed))
        if fraction is not None:
            segment = sharding.remaining(segment, topo, batch, consumed, block, seed, epoch, segment_id)
            assert sharding.segment_length(segment) == total - sum(len(r) for r in read)
    everything = np.concatenate(read)
    assert len(np.unique(everything)) == len(everything)  # nothing twice
    last = changes[-1][0]
    assert total - len(everything) < batch * last.num_ranks  # only the last topology's tail is left out
    assert len(segment) <= 2 * sum(t.num_slots for t, _ in changes) + sum(t.num_slots for t, _ in changes) * block


def test_segment_pieces_are_the_positions_each_slot_reads(big_sizes):
    """The pieces the loader reads for a slot of a segment (shard, start, stop) cover exactly that slot's
    positions of the segment, and the whole epoch is exact_pieces."""
    batch, seed, epoch = 16, 3, 0
    order = sharding.shard_order(len(big_sizes), seed, epoch)
    starts = np.concatenate([[0], np.cumsum(np.asarray(big_sizes)[order])])
    where = {int(order[i]): int(starts[i]) for i in range(len(order))}  # shard -> its first epoch position
    segment = sharding.remaining(sharding.whole_epoch(sum(big_sizes)), BIG, batch, 3, 24, seed, epoch, 0)
    small = Topology(48, 8, 6)
    _, ranges = sharding.segment_ranges(segment, small, batch)
    positions = np.concatenate([np.arange(a, b) for a, b in segment.tolist()])
    for slot in (0, 1, 1000, small.num_slots - 1):
        pieces = sharding.segment_pieces(big_sizes, segment, small, batch, seed, epoch, slot)
        got = np.concatenate([np.arange(where[p.shard] + p.start, where[p.shard] + p.stop) for p in pieces])
        assert np.array_equal(got, positions[ranges[slot, 0]:ranges[slot, 1]])
    whole = sharding.whole_epoch(sum(big_sizes))
    assert sharding.segment_pieces(big_sizes, whole, BIG, batch, seed, 1, 77) == \
        sharding.exact_assignment(big_sizes, BIG, batch, seed, 1)[77]
