"""`merge`: once every task is done, dedup across shards and write the dataset manifests.

Completeness comes from the task markers (`_tasks/task-I-of-N.json`, written by each task after it streamed the
whole input, holding the total shard count) and the repair markers (`_repairs/*.json`); every expected shard must
have its stats file, else merge names the missing ones and stops.

Exact dedup across shards is done here, not in the workers, because which copy survives must not depend on
which process got there first: the sample with the lowest input position wins, the others are removed from their
shards (rewritten atomically) and recorded as `duplicate (of KEY)`. Shards without duplicates are not touched.
"""
from __future__ import annotations

import dataclasses
import io
from collections import defaultdict
from typing import Any

import numpy as np

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


def merge(output: str) -> dict[str, Any]:
    out = OutputDir(output)
    opts = read_plan(out)
    planned, repairs = expected_shards(out)
    shards = planned + repairs
    missing = [shard_name(s) for s in shards if not out.exists(layout.stats_name(s))]
    if missing:
        raise ValueError(f"{output!r}: shards not finished: {', '.join(missing[:20])}"
                         f"{' ...' if len(missing) > 20 else ''} (rerun the tasks that own them)")
    if opts.dedup:
        dedup_across_shards(out, shards)
    summary = manifest.write_dataset_manifests(out, shards, repairs)
    # for the summary printed after a job: the target next to the bytes the manifest lists per shard
    return {**summary, "plan": {"samples_per_shard": opts.samples_per_shard, "shard_bytes": opts.shard_bytes,
                                "sizing": opts.sizing}}


def dedup_across_shards(out: OutputDir, shards: list[int]) -> int:
    """Sorts (hash, row) of every ok sample in numpy: 24 bytes per sample instead of a dict of hex strings.
    The first 128 bits of sha256 stand for the hash (a collision is not a practical concern)."""
    hi, lo, rows, shard_of = [], [], [], []
    for s in shards:
        t = manifest.read_records(out, layout.records_name(s), ["row", "status", "sha256"])
        ok = [(r, h) for r, st, h in zip(*(t.column(c).to_pylist() for c in ("row", "status", "sha256")))
              if st == "ok" and h]
        hi.append(np.array([int(h[:16], 16) for _, h in ok], np.uint64))
        lo.append(np.array([int(h[16:32], 16) for _, h in ok], np.uint64))
        rows.append(np.array([r for r, _ in ok], np.int64))
        shard_of.append(np.full(len(ok), s, np.int64))
    if not rows:
        return 0
    hi, lo, rows, shard_of = (np.concatenate(a) for a in (hi, lo, rows, shard_of))
    order = np.lexsort((rows, lo, hi))  # by hash, then by input position: the first copy wins
    hi, lo, rows, shard_of = hi[order], lo[order], rows[order], shard_of[order]
    same = np.r_[False, (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])]
    group_start = np.maximum.accumulate(np.where(~same, np.arange(len(same)), 0))
    losers: dict[int, dict[str, str]] = defaultdict(dict)
    for i in np.flatnonzero(same):
        losers[int(shard_of[i])][sample_key(int(rows[i]))] = sample_key(int(rows[group_start[i]]))
    for shard, dropped in losers.items():
        _drop_samples(out, shard, dropped)
    return int(same.sum())


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
