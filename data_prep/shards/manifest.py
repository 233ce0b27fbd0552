"""Per-sample records (one parquet row per input row) and the dataset manifests written by `merge`.

Per shard `S.parquet` columns (RECORD_SCHEMA): key, row (input position), shard, status ("ok" or "rejected"),
reason (null when ok), transient (true for failures `repair` retries: timeouts, 429/5xx, connection errors),
url (credentials removed), sha256 of the original bytes, width, height, original_width, original_height, bytes,
num_samples (samples this row put in the tar: 1, or one per frame with --frames-as-samples, 0 if rejected);
for a segment of a video (SEGMENT_FIELDS, null otherwise): video_id, segment_index (its index among the video's
segments), start and end (seconds). Records files written before those columns existed read with them null.

Dataset files (written by `merge` once every shard is done):
  sizes.json       {"00000.tar": num_samples, ...}: open_clip's convention, read by the loader.
  manifest.json    shards (name, num_samples, bytes, sha256), totals (input rows, ok, rejected), top reasons.
  samples.parquet  all shards' records; a row retried by `repair` keeps only its latest record, so
                   ok + rejected == input rows always.
"""
from __future__ import annotations

import io
from collections import Counter
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.shards import layout
from data_prep.shards.outdir import OutputDir
from data_prep.shards.scan import check_count

RECORD_SCHEMA = pa.schema([
    ("key", pa.string()), ("row", pa.int64()), ("shard", pa.int32()), ("status", pa.string()),
    ("reason", pa.string()), ("transient", pa.bool_()), ("url", pa.string()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
    ("original_height", pa.int32()), ("bytes", pa.int64()), ("num_samples", pa.int32()),
    ("video_id", pa.string()), ("segment_index", pa.int32()), ("start", pa.float64()), ("end", pa.float64()),
])
SEGMENT_FIELDS = ("video_id", "segment_index", "start", "end")
"""Nullable columns added last to RECORD_SCHEMA; `read_records` pads a records file that predates them."""


def reason_kind(reason: str) -> str:
    """The fixed phrase of a reason, without its details: 'http 404' stays, 'image too small (3x3 < 8)' ->
    'image too small'."""
    return reason.split(" (", 1)[0].split(": ", 1)[0]


def record(key: str, row: int, shard: int, url: str | None) -> dict[str, Any]:
    rec = {name: None for name in RECORD_SCHEMA.names}
    rec.update(key=key, row=row, shard=shard, url=url, status="ok", transient=False, num_samples=0)
    return rec


def write_shard_records(out: OutputDir, name: str, records: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.write_bytes(name, buf.getvalue())


def read_records(out: OutputDir, name: str, columns: list[str] | None = None) -> pa.Table:
    with out.fs.open(out.path(name), "rb") as f:
        return _pad_segment_fields(read_parquet(f, columns), columns)


def _pad_segment_fields(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """A whole records file of an older dataset with the SEGMENT_FIELDS columns it lacks, all null, appended in
    RECORD_SCHEMA's order: merge writes old and new shards' records as one table of RECORD_SCHEMA."""
    if columns is not None or not set(RECORD_SCHEMA.names[:-len(SEGMENT_FIELDS)]) <= set(table.column_names):
        return table
    for name in SEGMENT_FIELDS:
        if name not in table.column_names:
            field = RECORD_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table


def read_parquet(f, columns: list[str] | None = None) -> pa.Table:
    """A parquet file's columns from an open binary file, decoded in the calling thread.

    The file's bytes are read in Python and Arrow decodes them from memory with `use_threads=False`, so no Arrow
    thread is ever started. Handing Arrow the Python file object instead makes its I/O threads call back into
    Python; a thread that still holds such a reference when the interpreter finalizes aborts the process
    ("terminate called without an active exception", exit 134) after the command has finished, in about 1 run in
    25 on a loaded machine (apache/arrow#34314). Records and score files are read whole anyway.
    ParquetFile, not pq.read_table: the latter imports pyarrow.dataset and pandas (~0.5 s per job start).
    """
    return pq.ParquetFile(pa.py_buffer(f.read())).read(columns=columns, use_threads=False)


def write_dataset_manifests(out: OutputDir, shard_ids: Iterable[int],
                            repair_shards: Iterable[int] = ()) -> dict[str, Any]:
    """sizes.json, manifest.json and samples.parquet from the finished shards' stats and records, streamed shard
    by shard: memory grows with the rows of repair shards only, not with the dataset."""
    shard_ids = sorted(shard_ids)
    stats = [out.read_json(layout.stats_name(s)) for s in shard_ids]
    # planned shards hold disjoint rows; a repaired row is also in a later repair shard, whose record wins
    latest: dict[int, int] = {}
    for s in sorted(repair_shards):
        for row in read_records(out, layout.records_name(s), ["row"]).column("row").to_pylist():
            latest[row] = s
    num_rows = 0
    reasons: Counter[str] = Counter()
    num_ok = num_rejected = num_samples = 0
    with out.open_atomic(layout.RECORDS_FILE) as f, pq.ParquetWriter(f, RECORD_SCHEMA) as writer:
        for s in shard_ids:
            table = read_records(out, layout.records_name(s))
            keep = [latest.get(r, s) == s for r in table.column("row").to_pylist()]
            table = table.filter(pa.array(keep, pa.bool_()))
            num_rows += table.num_rows
            writer.write_table(table)
            for status, reason, n in zip(*(table.column(c).to_pylist() for c in ("status", "reason", "num_samples"))):
                if status == "ok":
                    num_ok += 1
                    num_samples += n
                else:
                    num_rejected += 1
                    reasons[reason_kind(reason)] += 1
    sizes = {st["tar"]: st["num_samples"] for st in stats}
    out.write_json(layout.SIZES_FILE, sizes)
    summary = {
        "format": layout.MANIFEST_FORMAT,
        "num_shards": len(stats), "num_input_rows": num_rows, "num_ok": num_ok, "num_rejected": num_rejected,
        "num_samples": num_samples,
        "reasons": dict(reasons.most_common()),
        "shards": [{"name": st["tar"], "num_samples": st["num_samples"], "bytes": st["bytes"], "sha256": st["sha256"]}
                   for st in stats],
    }
    assert num_samples == sum(sizes.values()), "per-sample manifest and shard stats disagree"
    out.write_json(layout.MANIFEST_FILE, summary)
    return summary


def read_manifest(out: OutputDir) -> dict:
    """A dataset's manifest.json, checked before any of it is used: an object whose `shards` entries each name a
    plain tar of this folder (layout.check_shard_name) with a count, a size and a sha256. ValueError naming the
    file and the bad entry."""
    where = out.path(layout.MANIFEST_FILE)
    summary = out.read_json_object(layout.MANIFEST_FILE)
    shards = summary.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{where}: expected an object with a 'shards' list")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: shards[{i}] is not an object")
        layout.check_shard_name(entry.get("name"), where)
        for key in ("num_samples", "bytes"):
            check_count(entry.get(key), where, f"shards[{i}].{key}")
        if not isinstance(entry.get("sha256"), str):
            raise ValueError(f"{where}: shards[{i}].sha256 must be a string")
    return summary
