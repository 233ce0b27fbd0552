"""`merge`: once every task is done, dedup across shards and write the dataset manifests.

Completeness comes from the task markers (`_tasks/task-I-of-N.json`, written by each task after it streamed the
whole input, holding the total shard count) and the repair markers (`_repairs/*.json`); every expected shard must
have its stats file, else merge names the missing ones and stops.

Exact dedup across shards is done here, not in the workers, because which copy survives must not depend on
which process got there first: the sample with the lowest input position wins, the others are removed from their
shards (rewritten atomically) and recorded as `duplicate (of KEY)`. Shards without duplicates are not touched.
The dedup is a partitioned sort through files in the temp folder, so its memory is bounded by
`DEDUP_MEMORY_BYTES`, not by the record count (see `dedup_across_shards`).
"""
from __future__ import annotations

import dataclasses
import io
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from data_prep.shards import manifest
from data_prep.shards import layout
from data_prep.options import JobOptions
from data_prep.job.plan import sample_key
from data_prep.shards.tarwalk import iter_samples
from data_prep.shards.writer import OutputDir, Sample, shard_name, write_shard


def read_plan(out: OutputDir) -> JobOptions:
    """The job's options as its shards were cut: `samples_per_shard` is the rows per shard actually used (with
    --shard-bytes the pilot's value, which `_plan.json` keeps apart from the user's cap), so `repair` sizes its
    shards like the others."""
    if not out.exists(layout.PLAN_FILE):
        raise FileNotFoundError(f"{out.url!r}: not a plait dataset folder (no _plan.json): only shards plait "
                                "built from an input can be merged or rebuilt; for shards from elsewhere use "
                                "`plait prep index` and `plait prep verify`")
    opts = JobOptions.from_dict(out.read_json(layout.PLAN_FILE))
    return dataclasses.replace(opts, samples_per_shard=opts.rows_per_shard)


def expected_shards(out: OutputDir) -> tuple[list[int], list[int]]:
    """(planned shards, repair shards) of a dataset whose tasks have all finished."""
    markers = [out.read_json(f"_tasks/{n}") for n in out.glob("_tasks/task-*.json")]
    by_count: dict[int, dict[int, dict]] = defaultdict(dict)
    for m in markers:
        by_count[m["num_tasks"]][m["task_index"]] = m
    complete = [tasks for n, tasks in by_count.items() if len(tasks) == n]
    if not complete:
        have = {n: sorted(t) for n, t in by_count.items()}
        raise ValueError(f"{out.url!r}: not all tasks have finished (finished task indices by task count: {have})")
    num = next(iter(complete[0].values()))["num_shards"]
    repairs = set()
    for name in out.glob("_repairs/repair-*.json"):
        repairs.update(out.read_json(f"_repairs/{name}")["shards"])
    return list(range(num)), sorted(repairs)


def merge(output: str, dedup_memory_bytes: int | None = None, progress: bool = False) -> dict[str, Any]:
    """`dedup_memory_bytes`: the dedup's memory budget (default `DEDUP_MEMORY_BYTES`)."""
    out = OutputDir(output)
    opts = read_plan(out)
    planned, repairs = expected_shards(out)
    shards = planned + repairs
    missing = [shard_name(s) for s in shards if not out.exists(layout.stats_name(s))]
    if missing:
        raise ValueError(f"{output!r}: shards not finished: {', '.join(missing[:20])}"
                         f"{' ...' if len(missing) > 20 else ''} (rerun the tasks that own them)")
    if opts.dedup:
        dedup_across_shards(out, shards, dedup_memory_bytes or DEDUP_MEMORY_BYTES, progress=progress)
    summary = manifest.write_dataset_manifests(out, shards, repairs)
    # for the summary printed after a job: the target next to the bytes the manifest lists per shard
    return {**summary, "plan": {"samples_per_shard": opts.samples_per_shard, "shard_bytes": opts.shard_bytes,
                                "sizing": opts.sizing}}


DEDUP_MEMORY_BYTES = 256 << 20
"""What the cross-shard dedup holds in memory at once (one bucket of hashes, one run being spilled, one group of
removals), before the rewrite of a shard; the process's peak is this plus one shard's records and the interpreter."""
_ENTRY = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<i8"), ("ordinal", "<i4")])
"""One ok sample: the first 128 bits of its sha256, its input position, and its shard's position in the merge."""
_LOSER = np.dtype([("ordinal", "<i4"), ("row", "<i8"), ("winner", "<i8")])
# a sort of n entries holds the entries, a copy in the new order, the order itself and the masks: ~3x their size
_SORT_BYTES_PER_ENTRY = 4 * _ENTRY.itemsize + 8
_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def dedup_across_shards(out: OutputDir, shards: list[int], memory_bytes: int = DEDUP_MEMORY_BYTES,
                        temp_dir: str | None = None, progress: bool = False) -> int:
    """Removes every ok sample whose sha256 an ok sample at a lower input position also has; returns how many.

    A partitioned sort, so that memory stays bounded as the record count grows (the previous in-memory sort held
    ~80-120 bytes per sample at its peak, benchmarks/bench_scale.py: 2.1 GiB at 20M records, over half a TB at
    LAION-5B's 5.85B): the first 128 bits of each sha256 (a collision is not a
    practical concern) with the sample's row and shard are spilled to `temp_dir` (default: the system temp folder)
    in runs sorted by hash; the hash space is then cut into buckets of at most `memory_bytes`, each bucket sorted
    by (hash, row, shard position) so that the lowest input position wins, as before; the removals are spilled
    too, and applied shard by shard in groups that fit `memory_bytes`. When every sample fits in one run nothing
    is spilled: the same code sorts in memory. Each run keeps one entry per hash and sets the others apart as
    copies, read back in slices, so one hash with millions of copies does not swell its bucket. Disk: ~28 bytes
    per ok sample plus 20 per duplicate.

    Not DuckDB, which also sorts parquet larger than memory: the winner rule and the removal lists stay in the
    fixed-width numpy sort the in-memory version used (both give byte-identical shards: see
    tests/test_merge_out_of_core.py), and no prep job needs a second query engine. DuckDB was not measured
    against it."""
    entries_per_sort = max(1, memory_bytes // _SORT_BYTES_PER_ENTRY)
    with tempfile.TemporaryDirectory(prefix="plait-merge-dedup-", dir=temp_dir) as tmp:
        runs, copies = _spill_hashes(out, shards, entries_per_sort, Path(tmp), progress)
        num_entries = sum(len(r) for r in runs)
        if not num_entries:
            return 0
        losers, per_shard = _find_duplicates(runs, copies, num_entries, len(shards), entries_per_sort, Path(tmp),
                                             progress)
        _remove_duplicates(out, shards, losers, per_shard, entries_per_sort, progress)
        return int(per_shard.sum())


def _hashes_of_shard(out: OutputDir, shard: int, ordinal: int) -> np.ndarray:
    t = manifest.read_records(out, layout.records_name(shard), ["row", "status", "sha256"])
    sha = t.column("sha256")
    keep = pc.and_(pc.equal(t.column("status"), "ok"), pc.greater(pc.fill_null(pc.utf8_length(sha), 0), 0))
    t = t.filter(keep)
    entries = np.empty(t.num_rows, _ENTRY)
    if not t.num_rows:
        return entries
    head = pc.utf8_slice_codeunits(t.column("sha256"), 0, 32).combine_chunks()
    if pc.min(pc.utf8_length(head)).as_py() != 32:
        raise ValueError(f"{layout.records_name(shard)}: a record's sha256 is shorter than 32 hex digits")
    if pc.max(pc.binary_length(head)).as_py() != 32:  # a non-ASCII character: more bytes than characters
        raise ValueError(f"{layout.records_name(shard)}: a record's sha256 is not hexadecimal")
    start = int(np.frombuffer(head.buffers()[1], np.int32)[head.offset])  # every head is 32 bytes: contiguous
    data = np.frombuffer(head.buffers()[2], np.uint8)
    nibbles = _HEX[data[start:start + 32 * len(head)]].reshape(-1, 32)
    if (nibbles == 255).any():
        raise ValueError(f"{layout.records_name(shard)}: a record's sha256 is not hexadecimal")
    words = ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(">u8")  # [n, 2] big-endian: hi, lo
    entries["hi"], entries["lo"] = words[:, 0], words[:, 1]
    entries["row"] = t.column("row").to_numpy()
    entries["ordinal"] = ordinal
    return entries


class _Run:
    """A run of entries sorted by one field (`hi`, or `ordinal` for removals), in memory or spilled to a file.

    A spilled run is read back by plain reads of one slice at a time, not through a lasting memmap: the pages of
    a mapped file count in the process's RSS once touched, so every run would end up resident."""

    def __init__(self, entries: np.ndarray, path: Path | None) -> None:
        self.dtype, self.length, self.path = entries.dtype, len(entries), path
        self.entries = entries if path is None else None
        if path is not None:
            entries.tofile(path)

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.path is None:
            return self.entries[start:stop]
        with open(self.path, "rb") as f:
            f.seek(start * self.dtype.itemsize)
            return np.fromfile(f, self.dtype, stop - start)

    def bounds(self, field: str, inner_cuts: np.ndarray) -> np.ndarray:
        """[0, first index >= each cut..., len]: the run's slice for each interval between cuts."""
        if not self.length:
            found = np.zeros(len(inner_cuts), np.int64)
        elif self.path is None:
            found = np.searchsorted(self.entries[field], inner_cuts, side="left")
        else:  # a binary search touches ~log2(n) pages per cut; unmapped again when `mapped` goes
            mapped = np.memmap(self.path, self.dtype, "r", shape=(self.length,))
            found = np.searchsorted(mapped[field], inner_cuts, side="left")
            del mapped
        return np.r_[0, found, self.length]


def _spill_hashes(out: OutputDir, shards: list[int], entries_per_run: int, folder: Path,
                  progress: bool) -> tuple[list[_Run], list[_Run]]:
    """(runs, copies): runs of the first entry of each hash within the run, and runs of the other entries, all
    sorted by (hash, row, shard position). Keeping one entry per hash per run is what bounds a bucket when one
    hash has millions of copies: they all go to the copies, which are read back in slices."""
    runs: list[_Run] = []
    copies: list[_Run] = []
    pending: list[np.ndarray] = []
    num_pending = 0

    def flush(spill: bool) -> None:
        nonlocal pending, num_pending
        entries = np.concatenate(pending) if pending else np.empty(0, _ENTRY)
        pending, num_pending = [], 0
        entries = entries[np.lexsort((entries["ordinal"], entries["row"], entries["lo"], entries["hi"]))]
        first = np.r_[True, (entries["hi"][1:] != entries["hi"][:-1]) | (entries["lo"][1:] != entries["lo"][:-1])]
        first = first[:len(entries)]
        runs.append(_Run(entries[first], folder / f"hashes-{len(runs)}.bin" if spill else None))
        if not first.all():
            copies.append(_Run(entries[~first], folder / f"copies-{len(copies)}.bin" if spill else None))

    for ordinal, shard in enumerate(tqdm(shards, desc="dedup: read hashes", unit="shard", disable=not progress)):
        entries = _hashes_of_shard(out, shard, ordinal)
        pending.append(entries)
        num_pending += len(entries)
        if num_pending >= entries_per_run:
            flush(spill=True)
    if pending or not runs:
        flush(spill=bool(runs))  # nothing spilled yet: the whole set is this one run, sorted in memory
    return runs, copies


def _find_duplicates(runs: list[_Run], copies: list[_Run], num_entries: int, num_shards: int,
                     entries_per_bucket: int, folder: Path, progress: bool) -> tuple[list[_Run], np.ndarray]:
    """Each bucket (a slice of the hash space, from every run) sorted by (hash, row, shard position): every entry
    after the first of its hash is a duplicate of that first one, and so is every entry of the copies (each came
    after its run's first). Returns runs of (shard position, row, winner row) sorted by shard position, and the
    duplicates per shard position."""
    # sha256 is uniform, so equal slices of the hash space hold about equal shares (10% slack for the spread);
    # a hash with many copies adds at most one entry per run here, its other copies are read in slices
    num_buckets = -(-num_entries * 11 // (10 * entries_per_bucket)) if len(runs) > 1 else 1
    cuts = np.array([(b << 64) // num_buckets for b in range(1, num_buckets)], np.uint64)
    bounds = [r.bounds("hi", cuts) for r in runs]
    copy_bounds = [r.bounds("hi", cuts) for r in copies]
    losers, per_shard = [], np.zeros(num_shards, np.int64)
    spill = len(runs) > 1

    def add(found: np.ndarray) -> None:
        nonlocal per_shard
        found = found[np.argsort(found["ordinal"], kind="stable")]
        per_shard += np.bincount(found["ordinal"], minlength=num_shards)
        losers.append(_Run(found, folder / f"duplicates-{len(losers)}.bin" if spill else None))

    for k in tqdm(range(num_buckets), desc="dedup: sort buckets", unit="bucket", disable=not progress):
        e = np.concatenate([r.read(b[k], b[k + 1]) for r, b in zip(runs, bounds)])
        e = e[np.lexsort((e["ordinal"], e["row"], e["lo"], e["hi"]))]
        same = np.r_[False, (e["hi"][1:] == e["hi"][:-1]) & (e["lo"][1:] == e["lo"][:-1])][:len(e)]
        group_start = np.maximum.accumulate(np.where(~same, np.arange(len(same)), 0))
        dup = np.flatnonzero(same)
        found = np.empty(len(dup), _LOSER)
        found["ordinal"], found["row"], found["winner"] = e["ordinal"][dup], e["row"][dup], e["row"][group_start[dup]]
        add(found)
        firsts = e[~same]  # one per hash, sorted by (hi, lo): the winners
        del e, found
        for r, b in zip(copies, copy_bounds):
            for start in range(b[k], b[k + 1], entries_per_bucket):
                c = r.read(start, min(start + entries_per_bucket, b[k + 1]))
                at = np.searchsorted(firsts["hi"], c["hi"], side="left")  # every copy's hash is among the firsts
                miss = firsts["lo"][at] != c["lo"]
                while miss.any():  # two hashes sharing their first 64 bits: step on to the one that matches
                    at[miss] += 1
                    miss = firsts["lo"][at] != c["lo"]
                found = np.empty(len(c), _LOSER)
                found["ordinal"], found["row"], found["winner"] = c["ordinal"], c["row"], firsts["row"][at]
                add(found)
    return losers, per_shard


def _remove_duplicates(out: OutputDir, shards: list[int], losers: list[_Run], per_shard: np.ndarray,
                       entries_per_group: int, progress: bool) -> None:
    """Rewrites the shards that hold duplicates, in groups of consecutive shard positions holding at most
    `entries_per_group` removals plus one shard's (cut by the counts, so duplicates crowded into a few shards
    still come in groups that fit)."""
    num_losers = int(per_shard.sum())
    if not num_losers:
        return
    group_of = (np.cumsum(per_shard) - per_shard) // entries_per_group  # by the removals before each shard
    cuts = (np.flatnonzero(np.diff(group_of)) + 1).astype(np.int32)
    num_groups = len(cuts) + 1
    bounds = [r.bounds("ordinal", cuts) for r in losers]
    with tqdm(total=num_losers, desc="dedup: rewrite shards", unit="sample", disable=not progress) as bar:
        for g in range(num_groups):
            found = np.concatenate([r.read(b[g], b[g + 1]) for r, b in zip(losers, bounds)])
            if not len(found):
                continue
            found = found[np.lexsort((found["row"], found["ordinal"]))]
            starts = np.flatnonzero(np.r_[True, found["ordinal"][1:] != found["ordinal"][:-1]])
            for lo, hi in zip(starts, np.r_[starts[1:], len(found)]):
                dropped = {sample_key(int(r)): sample_key(int(w))
                           for r, w in zip(found["row"][lo:hi], found["winner"][lo:hi])}
                _drop_samples(out, shards[int(found["ordinal"][lo])], dropped)
                bar.update(int(hi - lo))


def _drop_samples(out: OutputDir, shard_id: int, dropped: dict[str, str]) -> None:
    members: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for sample in iter_samples(io.BytesIO(out.read_bytes(layout.tar_name(shard_id)))):
        if sample.key.split("_", 1)[0] not in dropped:  # per-frame samples are `{row key}_{frame}`
            members[sample.key].extend(sample.members)
    records = manifest.read_records(out, layout.records_name(shard_id)).to_pylist()
    for rec in records:
        if rec["key"] in dropped:
            rec.update(status="rejected", reason=f"duplicate (of {dropped[rec['key']]})", transient=False,
                       num_samples=0)
    stats = out.read_json(layout.stats_name(shard_id))
    out.remove(layout.stats_name(shard_id))  # not done while being rewritten: a crash here is redone by resume
    write_shard(out, shard_id, [Sample(k, m) for k, m in members.items()], records, stats["num_input_rows"])
