"""The streaming training loader: shard specs in, equal-count train-ready batches out, resumable in O(1).

Design (see pipeline/data/sharding.py for the assignment itself):

* One torch DataLoader per epoch over `_EpochDataset`; each worker computes its own slot's pieces (shard,
  first sample, last sample) from (seed, epoch, topology): no coordination, no shared state.
* A worker reads its pieces (data_prep/shards/tarseek.py, webdataset's tar stages), shuffles them in blocks of
  `data.shuffle_buffer` raw samples, decodes (pipeline/data/transforms.py), and batches with webdataset's `batched`.
  Blocks replace webdataset's reservoir `shuffle` because a reservoir's content depends on the whole history
  of the stream: resuming it exactly would mean replaying the epoch. A block only depends on (seed, epoch,
  slot, block number), so a resumed worker reads one block of raw bytes and decodes nothing it skips.
* The DataLoader hands out batches round-robin over its workers, so the main process knows which worker
  produced the c-th batch of the epoch (sharding.consumed_per_worker): the whole loader state is
  (epoch, batches consumed in the epoch). To resume, each worker starts at its own consumed count, and the
  worker-to-slot mapping is rotated by c % workers so the round-robin continues with the right worker.
* Augmentation randomness is reseeded per sample from (seed, epoch, slot, position): a resumed run yields
  bit-identical batches. A bad sample (corrupt image, missing caption, truncated shard) is counted and replaced
  by a copy of the worker's last good one, so batch counts never change; above `data.max_bad_fraction` the run
  fails loudly.
* Shutdown: workers ignore the stop signals (SLURM signals every process; the main process checkpoints first),
  so they are stopped explicitly: `TrainStream.close()` (also `with stream:`, `closing_streams()`, and at
  interpreter exit, before multiprocessing would wait forever for them to exit), and they die with their parent
  (PR_SET_PDEATHSIG) if it is killed.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import logging
import os
import signal
import weakref
from collections import Counter
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import sharding
from pipeline.config import DataConfig
from pipeline.train.distributed import World
from pipeline.data.shardspec import ShardSet, parse_spec
from data_prep.shards.members import MemberKeys
from data_prep.shards.cache import ShardCache
from pipeline.options import parse_size
from data_prep.shards.tarseek import Bad, read_piece
from pipeline.data.transforms import SampleDecoder

log = logging.getLogger("plait.data")


class BadData(ValueError, RuntimeError):
    """The data cannot be trained on (every sample of a worker bad, or more than data.max_bad_fraction): a
    ValueError, so the CLI prints one line naming the first reason, and the RuntimeError it has always been."""


BAD_KINDS = ("decode_error", "missing_field", "short_shard", "unreadable_shard")
COUNTER_KINDS = ("samples",) + BAD_KINDS
# Below this many samples a rank does not judge the bad fraction (one early bad sample is not a 1% rate);
# the end of every epoch is judged regardless.
MIN_SAMPLES_FOR_BAD_CHECK = 1000


def topology(world: World, num_workers: int) -> sharding.Topology:
    if world.world_size % world.num_nodes:
        raise ValueError(f"{world.world_size} processes do not split evenly over {world.num_nodes} nodes")
    return sharding.Topology(world.num_nodes, world.world_size // world.num_nodes, max(1, num_workers))


def block_shuffle(items: Iterator, block: int, seed: int, epoch: int, slot: int, first_block: int,
                  skip: int, segment_id: int = 0) -> Iterator:
    """Items in blocks of `block`, each block permuted by (seed, epoch, slot, block number: sharding.block_order);
    the first `skip` items of the first block's permuted order are dropped (resume inside a block)."""
    number = first_block
    while True:
        chunk = [x for _, x in zip(range(block), items)]
        if not chunk:
            return
        order = sharding.block_order(seed, epoch, segment_id, slot, number, len(chunk)) if block > 1 else [0]
        for i in order[skip:]:
            yield chunk[i]
        skip, number = 0, number + 1


class _Warner:
    """Logs the first few bad samples of each kind, then only every power of two (rate-limited)."""

    def __init__(self):
        self.seen: Counter[str] = Counter()

    def __call__(self, bad: Bad, slot: int) -> None:
        self.seen[bad.kind] += 1
        n = self.seen[bad.kind]
        if n <= 3 or (n & (n - 1)) == 0:
            log.warning("bad sample #%d of kind %s in worker slot %d: %s", n, bad.kind, slot, bad.detail)


class _EpochDataset(IterableDataset):
    """The batches of one epoch for one rank; each DataLoader worker yields its slot's batches."""

    def __init__(self, stream: "TrainStream", epoch: int, consumed: int):
        self.stream, self.epoch, self.consumed = stream, epoch, consumed

    def __iter__(self) -> Iterator[dict]:
        s, topo = self.stream, self.stream.topology
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.consumed) % topo.workers_per_rank
        slot = topo.slot(s.world.rank, worker)
        done = sharding.consumed_per_worker(self.consumed, s.batches_per_epoch, topo.workers_per_rank)[worker]
        return s.slot_batches(self.epoch, slot, done * s.cfg.batch_size, worker)


def _one_line_bad_data(batches: Iterator[dict]) -> Iterator[dict]:
    """`batches`, with a BadData raised in a DataLoader worker re-raised as its own message: the DataLoader
    wraps a worker's exception in a message holding the worker's traceback, its last line the original."""
    try:
        yield from batches
    except BadData as exn:
        last = str(exn).strip().splitlines()[-1]
        raise BadData(last.split("BadData: ", 1)[-1]) from None


class TrainStream:
    """An endless iterator of batches, epoch after epoch, with equal batch counts on every rank.

    Batches: `image` float [B,3,H,W] (or `frames` [B,T,3,H,W] with data.video_frames=T>0), `text` long [B,L],
    and `__key__` (list of sample keys) and `__epoch__` when `with_keys`. `collate_hook(batch) -> batch` runs in the workers
    after collation (e.g. masks for masked modeling); it sees uint8 images when the preprocess ends in ToTensor +
    Normalize (transforms.split_transform), normalised afterwards in the main process."""

    def __init__(self, cfg: DataConfig, world: World, image_transform: Callable, tokenize: Callable,
                 with_keys: bool = False, collate_hook: Callable[[dict], dict] | None = None):
        self.cfg, self.world, self.tokenize = cfg, world, tokenize
        self.with_keys, self.collate_hook = with_keys, collate_hook
        self.decoder = SampleDecoder(image_transform, cfg.video_frames, cfg.draft,
                                     MemberKeys.parse(cfg.image_keys, cfg.caption_keys))
        self.shards: ShardSet = parse_spec(cfg.train_shards, estimate=cfg.mode == "resampled")
        self.cache = ShardCache(cfg.cache_dir.removeprefix("file://"), parse_size(cfg.cache_bytes)) if cfg.cache_dir else None
        self.topology = topology(world, cfg.num_workers)
        self.num_samples = self.shards.num_samples
        if cfg.mode == "exact":
            if len(set(self.shards.weights)) > 1:
                raise ValueError("data.train_shards: mixing weights (`spec@weight`) need data.mode=resampled; "
                                 "an exact epoch reads every sample once")
            sharding.check_exact(len(self.shards.urls), self.topology)
            epoch_samples = self.num_samples
        else:
            epoch_samples = cfg.epoch_samples or self.num_samples
            self.probabilities = self.shards.shard_probabilities()
        self.epoch_samples = epoch_samples
        self.epoch, self.consumed = 0, 0
        self.segment: np.ndarray | None = None
        """The epoch positions the rest of this epoch reads after an elastic resume (sharding.remaining);
        None: the whole epoch."""
        self.segment_id = 0
        """How many topology changes this epoch has seen (0: none); part of the order's seeds after one."""
        self.batches_per_epoch = self._segment_batches()
        self._base: Counter[str] = Counter()       # counts of DataLoaders that finished (or of the checkpoint)
        self._live: dict[int, torch.Tensor] = {}    # slot -> cumulative counts of the running DataLoader
        self._loader = None                         # the running DataLoader iterator (its workers), if any
        _OPEN_STREAMS.add(self)

    def close(self) -> None:
        """Stops the running epoch's worker processes now (idempotent; iterating again starts new ones). The
        loop calls this on any error or stop: workers ignore SIGTERM, and an interpreter exiting with them
        alive would wait for them forever."""
        loader, self._loader = self._loader, None
        if loader is None:
            return
        workers = list(getattr(loader, "_workers", ()))
        shutdown = getattr(loader, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # torch's orderly path: workers see their done event and return
        for worker in workers:  # its fallback, terminate(), is SIGTERM, which the workers ignore
            if worker.is_alive():
                worker.kill()
            worker.join(timeout=5)

    def __enter__(self) -> "TrainStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- the main process
    def _segment_batches(self) -> int:
        """Batches per rank of the current segment (the whole epoch, or its rest after an elastic resume)."""
        samples = self.epoch_samples if self.segment is None else sharding.segment_length(self.segment)
        return sharding.batches_per_rank(samples, self.cfg.batch_size, self.topology)

    def _next_epoch(self) -> None:
        self.epoch, self.consumed, self.segment, self.segment_id = self.epoch + 1, 0, None, 0
        self.batches_per_epoch = self._segment_batches()

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self.consumed < self.batches_per_epoch:
                yield from self._epoch()
            self._check_bad(final=True)
            self._next_epoch()

    def _epoch(self) -> Iterator[dict]:
        dataset = _EpochDataset(self, self.epoch, self.consumed)
        if self.cfg.num_workers == 0:
            batches = _rng_isolated(iter(dataset))
        else:
            # Own generator: the DataLoader draws worker base seeds from it, not from the loop's global RNG.
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                      pin_memory=torch.cuda.is_available(), worker_init_fn=_init_worker,
                                      generator=torch.Generator().manual_seed(self.cfg.seed)))
            self._loader = batches
        try:
            for batch in _one_line_bad_data(batches):
                slot = int(batch.pop("_slot"))
                self._live[slot] = batch.pop("_counts")
                self.consumed += 1
                self._check_bad()
                if self.with_keys:
                    batch["__epoch__"] = self.epoch
                yield self._finish(batch)
        finally:
            self._base.update(self._live_counts())
            self._live = {}
            self.close()
        if self.consumed != self.batches_per_epoch:
            raise RuntimeError(f"epoch {self.epoch} ended after {self.consumed} of {self.batches_per_epoch} "
                               f"batches on rank {self.world.rank}: the loader broke its batch-count invariant")

    def _finish(self, batch: dict) -> dict:
        """uint8 images from the workers -> normalised float, once per batch (transforms.split_transform)."""
        if self.decoder.normalize is not None:
            key = "frames" if "frames" in batch else "image"
            batch[key] = self.decoder.normalize(batch[key])
        return batch

    def _live_counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self._live.values():
            total.update({k: int(v) for k, v in zip(COUNTER_KINDS, counts.tolist()) if v})
        return total

    def counters(self) -> dict[str, int]:
        """Samples decoded and bad samples by kind on this rank since the start of training (for the log)."""
        total = self._base + self._live_counts()
        out = {k: total.get(k, 0) for k in COUNTER_KINDS}
        out["bad"] = sum(out[k] for k in BAD_KINDS)
        return out

    def _check_bad(self, final: bool = False) -> None:
        c = self.counters()
        seen = c["samples"] + c["bad"]
        if c["bad"] and (final or seen >= MIN_SAMPLES_FOR_BAD_CHECK) and c["bad"] > self.cfg.max_bad_fraction * seen:
            kinds = ", ".join(f"{k} {c[k]}" for k in BAD_KINDS if c[k])
            raise BadData(f"data: {c['bad']} of {seen} samples were bad on rank {self.world.rank} ({kinds}), "
                               f"above data.max_bad_fraction={self.cfg.max_bad_fraction}; see the warnings above")

    def _signature(self) -> dict:
        sizes = np.asarray(self.shards.sizes, dtype=np.int64)
        return {"mode": self.cfg.mode, "seed": self.cfg.seed, "batch_size": self.cfg.batch_size,
                "num_ranks": self.topology.num_ranks, "workers": self.topology.workers_per_rank,
                "shuffle_buffer": self.cfg.shuffle_buffer, "num_samples": self.num_samples,
                "epoch_samples": self.epoch_samples, "num_shards": len(sizes),
                "sizes_digest": hashlib.sha256(sizes.tobytes()).hexdigest()[:16],
                "batches_per_epoch": self.batches_per_epoch}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "counters": dict(self._base + self._live_counts()),
                "segment": None if self.segment is None else torch.from_numpy(self.segment.copy()),
                "segment_id": self.segment_id, "signature": self._signature()}

    def load_state_dict(self, state: dict) -> None:
        """Continues where `state` (this rank's, from a run of the same topology or any other) left off."""
        self.load_elastic([state], same_rank=True)

    def load_elastic(self, states: list[dict], step: int = 0, same_rank: bool = False) -> None:
        """Continues the data order of a checkpoint whose ranks saved `states` (rank order). On the same
        topology: where it stopped. On another one (processes, workers, batch size): the rest of its epoch,
        every sample not yet consumed read once (sharding.remaining); the epochs after it as a fresh run on this
        topology. The dataset, seed and mode must be the same. Counters carry over summed (on rank 0)."""
        state = states[0]
        saved, now = state.get("signature") or {}, self._signature()
        self.epoch, consumed = int(state["epoch"]), int(state.get("consumed", 0))
        self._live = {}
        if same_rank:
            self._base = Counter(state.get("counters", {}))
        else:
            self._base = sum((Counter(s.get("counters", {})) for s in states), Counter()) if self.world.is_main \
                else Counter()
        # Checkpoints of earlier versions lack some keys: only the keys both sides have are compared.
        fixed = [k for k in ("mode", "seed", "num_samples", "epoch_samples", "num_shards", "sizes_digest")
                 if k in saved]
        diff = {k: (saved[k], now[k]) for k in fixed if saved[k] != now[k]}
        if diff:
            names = ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            if self.cfg.resume_mismatch == "error":
                raise ValueError(f"cannot resume the data order: the dataset or its order changed since the "
                                 f"checkpoint ({names}); set data.resume_mismatch=next_epoch to continue from the "
                                 "next epoch instead")
            log.warning("data order changed since the checkpoint (%s): continuing at epoch %d", names, self.epoch + 1)
            return self._next_epoch()
        segment = state.get("segment")
        self.segment = None if segment is None else segment.numpy().astype(np.int64)
        self.segment_id = int(state.get("segment_id", 0))
        moved = [k for k in ("num_ranks", "workers", "batch_size", "shuffle_buffer") if saved.get(k, now[k]) != now[k]]
        if not moved:
            self.batches_per_epoch, self.consumed = self._segment_batches(), consumed
            return
        # Another topology: the rest of the epoch as a new segment, from the saved topology's consumption.
        old = sharding.Topology(int(saved["num_ranks"]), 1, int(saved["workers"]))
        batch, block = int(saved["batch_size"]), int(saved.get("shuffle_buffer", self.cfg.shuffle_buffer))
        current = self.segment if self.segment is not None else sharding.whole_epoch(self.epoch_samples)
        if self.cfg.mode == "exact":
            rest = sharding.remaining(current, old, batch, consumed, block, self.cfg.seed, self.epoch,
                                      self.segment_id)
        else:  # resampled: the rest of the virtual epoch's draws, drawn afresh for the new slots
            rest = sharding.whole_epoch(max(0, sharding.segment_length(current) - consumed * batch * old.num_ranks))
        self.segment, self.segment_id, self.consumed = rest, self.segment_id + 1, 0
        log.warning("the data order continues on another topology (%s): %d samples of epoch %d left to read",
                    ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in moved),
                    sharding.segment_length(rest), self.epoch)
        try:
            self.batches_per_epoch = self._segment_batches()
        except ValueError:  # the rest fills no global batch of this topology: the epoch is done
            self._next_epoch()

    # ---------------------------------------------------------------- inside a worker
    def slot_pieces(self, epoch: int, slot: int) -> list[sharding.Piece]:
        quota = int(sharding.slot_quotas(self.topology, self.cfg.batch_size, self.batches_per_epoch)[slot])
        if self.cfg.mode == "exact":
            segment = self.segment if self.segment is not None else sharding.whole_epoch(self.num_samples)
            return sharding.segment_pieces(self.shards.sizes, segment, self.topology, self.cfg.batch_size,
                                           self.cfg.seed, epoch, slot)
        return sharding.resampled_pieces(self.shards.sizes, self.probabilities, self.cfg.seed, epoch, slot, quota,
                                         self.segment_id)

    def slot_batches(self, epoch: int, slot: int, done: int, worker: int) -> Iterator[dict]:
        """The batches of `slot` in `epoch` after its first `done` samples (a multiple of the batch size)."""
        block = max(1, self.cfg.shuffle_buffer)
        first_block = done // block
        pieces = sharding.skip(self.slot_pieces(epoch, slot), first_block * block)
        raw = (s for p in pieces for s in read_piece(self.shards.urls[p.shard], p.start, p.stop, self.cache))
        shuffled = block_shuffle(raw, block, self.cfg.seed, epoch, slot, first_block, done - first_block * block,
                                 self.segment_id)
        counts = torch.zeros(len(COUNTER_KINDS), dtype=torch.long)
        examples = self._decoded(shuffled, epoch, slot, done, counts)
        batcher = wds.filters.batched(self.cfg.batch_size, collation_fn=self._collate, partial=False)
        for batch in batcher(examples):
            batch["_slot"], batch["_counts"] = torch.tensor(slot), counts.clone()
            yield batch

    def _decoded(self, items: Iterator, epoch: int, slot: int, position: int, counts: torch.Tensor) -> Iterator[dict]:
        """Decoded examples; a bad one is counted and replaced by the last good one (or the next, at the start)."""
        warn, last_good, pending, first_bad = _Warner(), None, 0, None
        seed = self.cfg.seed
        for item in items:
            # Per-sample seeds (the transforms draw from torch's global RNG): resumed batches are bit-identical,
            # whatever the stages read ahead (webdataset's batched pulls the next batch's first sample early).
            # The CPU generator only: torch.manual_seed also queues a CUDA reseed that captures a stack trace
            # on every call (9 ms per sample when CUDA is not initialised).
            where = (seed, epoch, slot, position) if not self.segment_id else (seed, epoch, slot, position,
                                                                                 self.segment_id)
            torch.default_generator.manual_seed(hash(where) & 0x7FFF_FFFF_FFFF)
            rng = np.random.default_rng([*where, 2])
            position += 1
            if not isinstance(item, Bad):
                try:
                    example = self.decoder(item, rng)
                except KeyError as exn:
                    why = exn.args[0] if exn.args else exn  # str(KeyError) would quote the reason
                    item = Bad("missing_field", f"{item.get('__url__')}:{item.get('__key__')}: {why}")
                except Exception as exn:  # PIL raises many types for corrupt images
                    item = Bad("decode_error", f"{item.get('__url__')}:{item.get('__key__')}: "
                                               f"{type(exn).__name__}: {exn}")
            if isinstance(item, Bad):
                counts[COUNTER_KINDS.index(item.kind)] += 1
                first_bad = first_bad or item
                warn(item, slot)
                if last_good is None:
                    pending += 1
                else:
                    yield last_good
                continue
            counts[0] += 1
            last_good = example
            for _ in range(pending + 1):
                yield example
            pending = 0
        if pending:
            raise BadData(f"data: every one of the {pending} samples read by worker slot {slot} in epoch {epoch} "
                          f"was bad; the first: {first_bad.kind}: {first_bad.detail}")

    def _collate(self, examples: list[dict]) -> dict:
        batch = {"text": self.tokenize([e["caption"] for e in examples])}  # [B,L]
        key = "frames" if "frames" in examples[0] else "image"
        batch[key] = torch.stack([e[key] for e in examples])  # [B,3,H,W] or [B,T,3,H,W]
        if self.with_keys:
            batch["__key__"] = [e["__key__"] for e in examples]
        return self.collate_hook(batch) if self.collate_hook else batch


_OPEN_STREAMS: "weakref.WeakSet[TrainStream]" = weakref.WeakSet()
_PR_SET_PDEATHSIG = 1


@atexit.register  # registered after torch's and multiprocessing's exit hooks, so it runs before them
def _close_open_streams() -> None:
    for stream in list(_OPEN_STREAMS):
        stream.close()


@contextlib.contextmanager
def closing_streams():
    """Closes every TrainStream created inside the block when it ends, by error or not (the training loop's
    guarantee that an exception or stop leaves no worker behind, without threading the stream through)."""
    before = set(map(id, _OPEN_STREAMS))
    try:
        yield
    finally:
        for stream in list(_OPEN_STREAMS):
            if id(stream) not in before:
                stream.close()


def _init_worker(_worker_id: int) -> None:
    """SLURM signals every process of a step and Ctrl-C every process of the terminal; a worker dying on the
    signal would crash the loop before it can checkpoint. The main process handles the signals and shuts the
    workers down itself (TrainStream.close). And a worker must not outlive its parent: the kernel kills it
    when the parent dies (Linux; elsewhere torch's own watchdog ends it within seconds)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _rng_isolated(batches: Iterator[dict]) -> Iterator[dict]:
    """Without workers, decoding runs in the training process: keep its per-batch reseeding away from the
    loop's own torch RNG (masks, dropout)."""
    while True:
        state = torch.get_rng_state()
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield batch

