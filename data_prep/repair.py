"""`plait prep repair DIR`: retry the transient failures of a finished dataset into additional shards.

Only rows whose record says `transient` (timeouts, 429/5xx, connection and DNS errors) are retried; they are
read again from the original input (the manifests hold no credentials, the input may), built into new shards
numbered after the existing ones, and `merge` then lets each row's latest record win. The repair marker
(`_repairs/repair-FIRST.json`) is written before any shard, with the rows of each new shard, so a killed repair
is completed by the next `repair` instead of being planned again.
"""
from __future__ import annotations

import json
from typing import Any

from data_prep import manifest
from data_prep.merge import expected_shards, merge, read_plan
from data_prep.run import build_units, format_summary
from data_prep.sources import input_fingerprint, read_rows
from data_prep.writer import OutputDir, shard_name


def repair(output: str, processes: int = 1, progress: bool = True, log=print) -> dict[str, Any]:
    out = OutputDir(output)
    opts = read_plan(out)
    if not out.exists("samples.parquet"):
        raise ValueError(f"{output!r}: not merged yet; run `plait prep merge {output}` first")
    # rows are found again by their position in the input: another version of it would put other rows there
    now = input_fingerprint(opts.source.input)
    if opts.input_fingerprint is not None and json.loads(json.dumps(now)) != opts.input_fingerprint:
        raise ValueError(f"--input {opts.source.input!r} changed since {output!r} was built; repair needs the "
                         "same input")
    pending = [out.read_json(f"_repairs/{n}") for n in out.glob("_repairs/repair-*.json")]
    pending = [m for m in pending if not m.get("done")]
    if pending:
        marker = pending[0]
    else:
        table = manifest.read_records(out, "samples.parquet", ["row", "status", "transient"])
        retry = sorted(r for r, s, t in zip(*(table.column(c).to_pylist() for c in ("row", "status", "transient")))
                       if s != "ok" and t)
        if not retry:
            log("nothing to repair: no transient failures")
            return out.read_json("manifest.json")
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
    todo = ((s, rows) for s, rows in sorted(units.items()) if not out.exists(f"{shard_name(s)}_stats.json"))
    log(f"repairing {len(shard_of)} row(s) into shard(s) {', '.join(shard_name(s) for s in units)}")
    build_units(opts, todo, processes, progress)
    out.write_json(name, {**marker, "done": True})
    summary = merge(output)
    log(format_summary(summary))
    return summary
