"""Which samples each (node, rank, worker) reads in an epoch: pure functions of (sizes, seed, epoch, topology).

This replaces webdataset's `split_by_node` / `split_by_worker` / `detshuffle` stages: they deal whole shards
round-robin, which from uneven shards gives ranks unequal sample counts (open_clip pads with `with_epoch` and
repeats samples) and cannot start a worker in the middle of a shard, which exact epochs and O(1) resume need.

Nothing here opens a file or starts a process, so the assignment is tested at cluster scale (64 nodes x 8 ranks
x 8 workers) in milliseconds, and every worker computes its own share without talking to the others.

Slots. Each DataLoader worker of each rank is a slot, numbered node-major: slot = rank * workers + worker with
rank = node * ranks_per_node + local_rank. Contiguous slot ranges therefore split the data by node, then by
rank, then by worker.

Equal batches by construction. Every rank yields `batches_per_rank` full batches per epoch; within a rank, worker
k gets `q + (k < r)` of them (q, r = divmod(batches_per_rank, workers)). A slot's quota is its batch count times
the batch size, so no rank ever waits for another at an epoch end (no DDP hang), whatever the shard sizes.

Exact mode. The shard list is permuted with (seed, epoch); the permuted shards are concatenated into one
sequence of samples and slot s reads the contiguous range [offset_s, offset_s + quota_s). A range may start or
end inside a shard (the reader seeks there, see data_prep/shards/tarseek.py), so every sample is read exactly once per
epoch; only the tail that cannot fill one more global batch (< batch_size x ranks samples, a different tail
each epoch) is left out.

Resampled mode. Slot s draws whole shards with replacement from a generator seeded by (seed, epoch, s), with the
mixing probabilities of pipeline/data/shardspec.py, until its quota is filled.

Segments: elastic resume. An epoch is read as one segment, the whole permuted sequence, unless the topology
changes inside it. A run resumed on another number of ranks or workers continues the epoch with a new segment:
the samples of the current one that no slot has consumed yet (`remaining`), as intervals of positions in the
epoch's sequence. The new topology assigns the segment exactly as an epoch (`segment_pieces`): contiguous slot
ranges of the segment's samples, equal batches per rank, the tail that fills no global batch left out; the next
epoch starts whole again. Consumption is exact to the sample: a worker shuffles its stream in blocks
(`block_order`), so inside the block it was reading it consumed a permuted subset, and exactly the rest of that
block goes into the segment. Several changes in one epoch chain: each segment is a subset of the one before, in
epoch positions. A segment holds at most one interval per slot plus the leftovers of partly read blocks (at most
half a shuffle block per slot, in runs), and computing it reads nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Shards drawn per generator call in resampled mode; part of the order's definition (changing it changes orders).
_DRAW_CHUNK = 64


@dataclass(frozen=True)
class Topology:
    """The reading processes: num_nodes x ranks_per_node ranks, each with workers_per_rank DataLoader workers."""

    num_nodes: int
    ranks_per_node: int
    workers_per_rank: int

    def __post_init__(self):
        assert min(self.num_nodes, self.ranks_per_node, self.workers_per_rank) >= 1, self

    @property
    def num_ranks(self) -> int:
        return self.num_nodes * self.ranks_per_node

    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.workers_per_rank

    def slot(self, rank: int, worker: int) -> int:
        return rank * self.workers_per_rank + worker


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard number `shard` (an index into the spec's shard list), in file order."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def worker_batches(batches_per_rank: int, workers: int) -> list[int]:
    """Batches each worker of a rank yields per epoch; the first ones get one more when it does not divide."""
    q, r = divmod(batches_per_rank, workers)
    return [q + (k < r) for k in range(workers)]


def consumed_per_worker(consumed: int, batches_per_rank: int, workers: int) -> list[int]:
    """Batches taken from each worker after the rank consumed `consumed` batches of the epoch.

    torch's DataLoader hands out batches round-robin over its workers (w0, w1, ..., skipping exhausted ones),
    and worker_batches() gives the first workers the extra batches, so after c batches worker k gave
    c // workers + (k < c % workers)."""
    assert 0 <= consumed <= batches_per_rank, (consumed, batches_per_rank)
    q, r = divmod(consumed, workers)
    return [q + (k < r) for k in range(workers)]


def batches_per_rank(num_samples: int, batch_size: int, topo: Topology) -> int:
    """Full batches every rank yields in an epoch of `num_samples` samples; raises when not even one fits."""
    global_batch = batch_size * topo.num_ranks
    count = num_samples // global_batch
    if count == 0:
        raise ValueError(f"{num_samples} samples per epoch cannot fill one global batch of {global_batch} "
                         f"(data.batch_size {batch_size} x {topo.num_ranks} ranks)")
    return count


def check_exact(num_shards: int, topo: Topology) -> None:
    """Exact mode reads disjoint shard ranges; with fewer shards than slots, workers would share shards."""
    if num_shards < topo.num_slots:
        raise ValueError(
            f"exact mode needs at least ranks x workers = {topo.num_ranks} x {topo.workers_per_rank} = "
            f"{topo.num_slots} shards, got {num_shards}: reshard into more files, lower data.num_workers, "
            f"or use data.mode=resampled")


def slot_quotas(topo: Topology, batch_size: int, per_rank: int) -> np.ndarray:
    """Samples each slot reads per epoch, in slot order. [num_slots]"""
    per_worker = np.asarray(worker_batches(per_rank, topo.workers_per_rank), dtype=np.int64) * batch_size
    return np.tile(per_worker, topo.num_ranks)


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the shard list (exact mode)."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def _ranges_to_pieces(order: np.ndarray, bounds: np.ndarray, start: int, stop: int) -> list[Piece]:
    """Pieces covering samples [start, stop) of the concatenation of shards `order` (bounds: its cumsum, 0-led)."""
    pieces = []
    i = int(np.searchsorted(bounds, start, side="right")) - 1
    while start < stop:
        shard_stop = int(bounds[i + 1])
        end = min(stop, shard_stop)
        if end > start:
            pieces.append(Piece(int(order[i]), start - int(bounds[i]), end - int(bounds[i])))
        start, i = end, i + 1
    return pieces


def exact_assignment(sizes: Sequence[int], topo: Topology, batch_size: int, seed: int,
                     epoch: int) -> list[list[Piece]]:
    """Every slot's pieces for one exact epoch (slot order). Workers call exact_pieces() for their own slot."""
    check_exact(len(sizes), topo)
    order = shard_order(len(sizes), seed, epoch)
    bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64)[order])])
    quotas = slot_quotas(topo, batch_size, batches_per_rank(int(bounds[-1]), batch_size, topo))
    starts = np.concatenate([[0], np.cumsum(quotas)])
    return [_ranges_to_pieces(order, bounds, int(starts[s]), int(starts[s + 1])) for s in range(topo.num_slots)]


def exact_pieces(sizes: Sequence[int], topo: Topology, batch_size: int, seed: int, epoch: int,
                 slot: int) -> list[Piece]:
    """Slot `slot`'s pieces for one exact epoch."""
    return segment_pieces(sizes, whole_epoch(int(sum(sizes))), topo, batch_size, seed, epoch, slot)


def resampled_pieces(sizes: Sequence[int], probabilities: np.ndarray, seed: int, epoch: int, slot: int,
                     quota: int, segment_id: int = 0) -> list[Piece]:
    """Whole shards drawn with replacement for slot `slot` until `quota` samples; the last one is cut short.
    After a topology change (`segment_id` > 0) the draws are new ones, not a replay of the consumed part."""
    rng = np.random.default_rng([seed, epoch, slot, 1] if segment_id == 0 else [seed, epoch, slot, 1, segment_id])
    pieces, filled = [], 0
    while filled < quota:
        for shard in rng.choice(len(sizes), size=_DRAW_CHUNK, p=probabilities):
            take = min(int(sizes[shard]), quota - filled)
            if take > 0:
                pieces.append(Piece(int(shard), 0, take))
                filled += take
            if filled == quota:
                break
    return pieces


# ------------------------------------------------------------------------------------------------- segments
def whole_epoch(num_samples: int) -> np.ndarray:
    """The segment of an epoch read without a topology change: every position. [1, 2]"""
    return np.array([[0, num_samples]], dtype=np.int64)


def block_order(seed: int, epoch: int, segment_id: int, slot: int, number: int, length: int) -> np.ndarray:
    """The order a slot's worker reads block `number` (of `length` samples) of its stream in. Segment 0 keeps
    the key of plait's first checkpoints, so they resume into the same order."""
    key = [seed, epoch, slot, number] if segment_id == 0 else [seed, epoch, slot, number, segment_id]
    return np.random.default_rng(key).permutation(length)


def _epoch_layout(sizes: Sequence[int], seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    order = shard_order(len(sizes), seed, epoch)
    return order, np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64)[order])])


def _virtual_to_epoch(segment: np.ndarray, start: int, stop: int) -> list[tuple[int, int]]:
    """Positions [start, stop) of the segment's own numbering as intervals of epoch positions."""
    lengths = segment[:, 1] - segment[:, 0]
    cum = np.concatenate([[0], np.cumsum(lengths)])
    out, i = [], int(np.searchsorted(cum, start, side="right")) - 1
    while start < stop:
        end = min(stop, int(cum[i + 1]))
        if end > start:
            a = int(segment[i, 0])
            out.append((a + start - int(cum[i]), a + end - int(cum[i])))
        start, i = end, i + 1
    return out


def _merged(intervals: list[tuple[int, int]]) -> np.ndarray:
    out: list[list[int]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def segment_length(segment: np.ndarray) -> int:
    return int((segment[:, 1] - segment[:, 0]).sum())


def segment_ranges(segment: np.ndarray, topo: Topology, batch_size: int) -> tuple[int, np.ndarray]:
    """(batches per rank, each slot's [start, stop) in the segment's own numbering) [num_slots, 2]."""
    per_rank = batches_per_rank(segment_length(segment), batch_size, topo)
    starts = np.concatenate([[0], np.cumsum(slot_quotas(topo, batch_size, per_rank))])
    return per_rank, np.stack([starts[:-1], starts[1:]], axis=1)


def segment_pieces(sizes: Sequence[int], segment: np.ndarray, topo: Topology, batch_size: int, seed: int,
                   epoch: int, slot: int) -> list[Piece]:
    """Slot `slot`'s pieces of `segment` in exact mode (the whole epoch: exact_pieces)."""
    check_exact(len(sizes), topo)
    order, bounds = _epoch_layout(sizes, seed, epoch)
    _, ranges = segment_ranges(segment, topo, batch_size)
    return [p for a, b in _virtual_to_epoch(segment, int(ranges[slot, 0]), int(ranges[slot, 1]))
            for p in _ranges_to_pieces(order, bounds, a, b)]


def remaining(segment: np.ndarray, topo: Topology, batch_size: int, consumed: int, block: int, seed: int,
              epoch: int, segment_id: int) -> np.ndarray:
    """The positions of `segment` that no slot has consumed once every rank took `consumed` batches of it
    (as intervals of epoch positions, sorted, merged): what a resume on another topology reads in the rest of
    the epoch. Includes the segment's tail that this topology would have left out."""
    per_rank, ranges = segment_ranges(segment, topo, batch_size)
    done = consumed_per_worker(consumed, per_rank, topo.workers_per_rank)
    block = max(1, block)
    left: list[tuple[int, int]] = []
    for slot, (v0, v1) in enumerate(ranges.tolist()):
        used = done[slot % topo.workers_per_rank] * batch_size
        full, part = divmod(used, block)
        cut = v0 + full * block                   # blocks before it are consumed whole
        if part:
            length = min(block, v1 - cut)
            rest = np.sort(block_order(seed, epoch, segment_id, slot, full, length)[part:]) + cut
            runs = np.split(rest, np.flatnonzero(np.diff(rest) != 1) + 1)
            left += [(int(r[0]), int(r[-1]) + 1) for r in runs if len(r)]
            cut += length
        left.append((cut, v1))
    left.append((int(ranges[-1, 1]), segment_length(segment)))  # the tail no slot reads
    return _merged([iv for a, b in left for iv in _virtual_to_epoch(segment, a, b)])


def skip(pieces: list[Piece], num_samples: int) -> list[Piece]:
    """The pieces that remain after the first `num_samples` samples (the resume point of a slot)."""
    out = []
    for piece in pieces:
        if num_samples >= len(piece):
            num_samples -= len(piece)
            continue
        out.append(Piece(piece.shard, piece.start + num_samples, piece.stop))
        num_samples = 0
    return out
