"""`plait prep repair DIR`: rebuild damaged shards, and retry the transient failures into additional shards.

Damaged shards first: a tar that is missing, unreadable, truncated, or whose bytes or sha256 differ from the
manifest (what `plait prep verify` reports as such), or an expected shard without its stats file, is built again
from its input rows (its stats file, the done marker, is removed first, so a killed rebuild is redone by the next
`repair` or `shard` run), and the dataset is merged again.

Only rows whose record says `transient` (timeouts, 429/5xx, connection and DNS errors) are retried; they are
read again from the original input (the manifests hold no credentials, the input may), built into new shards
numbered after the existing ones, and `merge` then lets each row's latest record win. The repair marker
(`_repairs/repair-FIRST.json`) is written before any shard, with the rows of each new shard, so a killed repair
is completed by the next `repair` instead of being planned again.
"""
from __future__ import annotations

import json
from typing import Any

from data_prep.shards import manifest
from data_prep.shards import layout
from data_prep.maintenance.merge import expected_shards, merge, read_plan
from data_prep.job.run import build_units, format_summary
from data_prep.input.access import input_fingerprint
from data_prep.input.sources import read_rows
from data_prep.shards.writer import OutputDir, shard_name


def check_input_unchanged(opts) -> None:
    """Rows are found again by their position in the input: another version of it would put other rows there."""
    now = json.loads(json.dumps(input_fingerprint(opts.source.input)))
    if opts.input_fingerprint is not None and now != opts.input_fingerprint:
        raise ValueError(f"--input {opts.source.input!r} changed since {opts.output!r} was built (was "
                         f"{opts.input_fingerprint}, now {now}); rebuilding needs the same input")


def damaged_shards(output: str) -> list[str]:
    """Tar names of a merged plait dataset that must be rebuilt: damaged, or expected but never finished."""
    from data_prep.maintenance.verify import verify
    out = OutputDir(output)
    planned, repairs = expected_shards(out)
    unfinished = [layout.tar_name(s) for s in planned + repairs if not out.exists(layout.stats_name(s))]
    return sorted(set(verify(output, decode_fraction=0).bad_shards) | set(unfinished))


def rebuild_shards(output: str, names: list[str], processes: int = 1, progress: bool = True,
                   log=print) -> dict[str, Any]:
    """Builds shards `names` (e.g. "00003.tar") again from the input rows they were cut from, then merges."""
    out = OutputDir(output)
    opts = read_plan(out)
    check_input_unchanged(opts)
    planned, _ = expected_shards(out)
    repair_rows = {int(s): rows for n in out.glob("_repairs/repair-*.json")
                   for s, rows in out.read_json(f"_repairs/{n}")["rows"].items()}
    ids = sorted({int(n.removesuffix(".tar")) for n in names})
    unknown = [shard_name(i) for i in ids if i not in repair_rows and not 0 <= i < len(planned)]
    if unknown:
        raise ValueError(f"{output!r}: shard(s) {', '.join(unknown)} are not part of this dataset's plan")
    for i in ids:
        out.remove(layout.stats_name(i))  # the done marker first: a killed rebuild is redone, not skipped
    shard_of = {row: i for i in ids if i in repair_rows for row in repair_rows[i]}
    units: dict[int, list] = {i: [] for i in ids}
    per = opts.samples_per_shard
    for row in read_rows(opts.source):  # a retried row belongs to its planned shard and to its repair shard
        if row.index in shard_of:
            units[shard_of[row.index]].append(row)
        if row.index // per in units and row.index // per < len(planned):
            units[row.index // per].append(row)
    log(f"rebuilding {len(ids)} damaged shard(s): {', '.join(shard_name(i) for i in ids)}")
    build_units(opts, iter(sorted(units.items())), processes, progress)
    return merge(output)


def repair(output: str, processes: int = 1, progress: bool = True, log=print) -> dict[str, Any]:
    out = OutputDir(output)
    opts = read_plan(out)
    if not out.exists(layout.RECORDS_FILE):
        raise ValueError(f"{output!r}: not merged yet; run `plait prep merge {output}` first")
    check_input_unchanged(opts)
    damaged = damaged_shards(output)
    if damaged:
        rebuild_shards(output, damaged, processes, progress, log)
    pending = [out.read_json(f"_repairs/{n}") for n in out.glob("_repairs/repair-*.json")]
    pending = [m for m in pending if not m.get("done")]
    if pending:
        marker = pending[0]
    else:
        table = manifest.read_records(out, layout.RECORDS_FILE, ["row", "status", "transient"])
        retry = sorted(r for r, s, t in zip(*(table.column(c).to_pylist() for c in ("row", "status", "transient")))
                       if s != "ok" and t)
        if not retry:
            log("nothing to repair: no transient failures")
            return out.read_json(layout.MANIFEST_FILE)
        planned, repairs = expected_shards(out)
        first = max(planned + repairs, default=-1) + 1
        per = opts.samples_per_shard
        groups = [retry[i:i + per] for i in range(0, len(retry), per)]
        marker = {"first": first, "shards": [first + i for i in range(len(groups))],
                  "rows": {str(first + i): g for i, g in enumerate(groups)}, "done": False}
        out.write_json(f"_repairs/repair-{first:05d}.json", marker)
    name = f"_repairs/repair-{marker['first']:05d}.json"
    shard_of = {row: int(s) for s, rows in marker["rows"].items() for row in rows}
    units: dict[int, list] = {int(s): [] for s in marker["rows"]}
    for row in read_rows(opts.source):
        if row.index in shard_of:
            units[shard_of[row.index]].append(row)
    todo = ((s, rows) for s, rows in sorted(units.items()) if not out.exists(layout.stats_name(s)))
    log(f"repairing {len(shard_of)} row(s) into shard(s) {', '.join(shard_name(s) for s in units)}")
    build_units(opts, todo, processes, progress)
    out.write_json(name, {**marker, "done": True})
    summary = merge(output)
    log(format_summary(summary))
    return summary
