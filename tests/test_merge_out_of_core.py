"""The merge's cross-shard dedup as a partitioned sort (issue 27): with a memory budget so small that every shard
spills its own run, the hash space splits into many buckets and the removals into many groups, a real prep run
with planted duplicates merges to the same files as with the whole set sorted in memory."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.cli import main
from data_prep.job.plan import sample_key
from data_prep.maintenance import merge
from data_prep.shards import manifest
from data_prep.shards.writer import OutputDir, Sample, write_shard
from tests.helpers.prep_corpus import real_photos

PHOTOS = "/usr/share/doc/opencv-doc"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def unmerged(tmp_path_factory) -> Path:
    """Task 0 of 1 (so nothing merges yet): 8 distinct photos, planted again in later shards, 4 rows a shard (copies
    within one shard are the worker's to settle, not the merge's)."""
    tmp = tmp_path_factory.mktemp("merge")
    photos = real_photos(limit=8)
    order = photos + photos[::-1] + photos[:3] + photos[5:6]  # shards 2-4 hold only copies of rows 0-7
    table = tmp / "in.jsonl"
    table.write_text("".join(f'{{"url": "{u}", "caption": "row {i}"}}\n' for i, u in enumerate(order)))
    out = tmp / "out"
    main(["shard", "--input", str(table), "--output", str(out), "--samples-per-shard", "4", "--image-size", "32",
          "--local-root", PHOTOS, "--processes", "1", "--no-progress", "--task-index", "0", "--num-tasks", "1"])
    assert not (out / "samples.parquet").exists()
    return out


def _merged(unmerged: Path, tmp_path: Path, name: str, memory_bytes: int | None) -> Path:
    out = tmp_path / name
    shutil.copytree(unmerged, out)
    merge.merge(str(out), dedup_memory_bytes=memory_bytes)
    return out


def test_out_of_core_merge_writes_what_the_in_memory_merge_writes(unmerged, tmp_path):
    in_memory = _merged(unmerged, tmp_path, "in-memory", 1 << 30)
    # 2 entries per sort: a run per shard, ~12 buckets of the hash space, a group of shards per removal
    out_of_core = _merged(unmerged, tmp_path, "out-of-core", 2 * merge._SORT_BYTES_PER_ENTRY)
    assert _files(out_of_core) == _files(in_memory)

    recs = pq.read_table(in_memory / "samples.parquet").to_pylist()
    assert len(recs) == 20
    first: dict[str, int] = {}
    for r in sorted(recs, key=lambda r: r["row"]):
        if r["sha256"] is not None:
            first.setdefault(r["sha256"], r["row"])
    removed = {r["row"]: r["reason"] for r in recs if r["status"] != "ok"}
    # every copy after the first in input order, wherever it sits, names the first; the firsts are all kept
    assert removed == {r["row"]: f"duplicate (of {sample_key(first[r['sha256']])})" for r in recs
                       if r["sha256"] is not None and first[r["sha256"]] != r["row"]}
    assert len(removed) == 12 and sorted(first.values()) == list(range(8))
    # shards without duplicates (0 and 1 hold rows 0-7, the firsts) are left as the task wrote them
    for name in ("00000.tar", "00000.parquet", "00001.tar", "00001_stats.json"):
        assert (in_memory / name).read_bytes() == (unmerged / name).read_bytes()
    assert (in_memory / "00002.tar").read_bytes() != (unmerged / "00002.tar").read_bytes()


def test_budget_smaller_than_a_shard_spills_and_counts_every_duplicate(unmerged, tmp_path):
    out = tmp_path / "direct"
    shutil.copytree(unmerged, out)
    shards = list(range(5))
    assert merge.dedup_across_shards(OutputDir(str(out)), shards, merge._SORT_BYTES_PER_ENTRY,
                                     temp_dir=str(tmp_path)) == 12
    assert not list(tmp_path.glob("plait-merge-dedup-*"))  # the spill folder is removed after use
    assert merge.dedup_across_shards(OutputDir(str(out)), shards, 1 << 20) == 0  # a rerun finds nothing left


def test_a_record_with_a_bad_hash_is_named(unmerged, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(unmerged, out)
    t = pq.read_table(out / "00001.parquet")
    for bad in ("zz" * 32, "é" * 64):  # not hex digits; not even one byte each
        pq.write_table(t.set_column(t.schema.get_field_index("sha256"), "sha256",
                                    [[bad] + t.column("sha256").to_pylist()[1:]]), out / "00001.parquet")
        with pytest.raises(ValueError, match=r"^00001\.parquet: a record's sha256 is not hexadecimal$"):
            merge.merge(str(out))


def _crowded_dataset(folder: Path) -> dict[int, str]:
    """6 finished shards of 6 samples as the shard writer leaves them before the merge; one sha256 on 31 of the 36
    (5 in each shard, all 6 in the last, as a placeholder image would be), the others distinct. Returns
    {row: sha256}."""
    out = OutputDir(str(folder))
    crowded = hashlib.sha256(b"placeholder").hexdigest()
    shas = {}
    for s in range(6):
        records, samples = [], []
        for i in range(6):
            row = s * 6 + i
            shas[row] = crowded if row % 6 != 5 or s == 5 else hashlib.sha256(str(row).encode()).hexdigest()
            rec = manifest.record(sample_key(row), row, s, None)
            rec.update(sha256=shas[row], num_samples=1, width=8, height=8, bytes=1)
            records.append(rec)
            samples.append(Sample(sample_key(row), [("txt", f"row {row}".encode())]))
        write_shard(out, s, samples, records, 6)
    return shas


def test_one_hash_with_many_copies_is_read_in_slices(tmp_path):
    outputs = {}
    for name, memory in (("in-memory", 1 << 30), ("sliced", 4 * merge._SORT_BYTES_PER_ENTRY)):
        folder = tmp_path / name
        shas = _crowded_dataset(folder)
        # 4 entries per sort: a run per shard, its copies of the crowded hash read back 4 at a time (the last
        # shard's 5 in two slices)
        assert merge.dedup_across_shards(OutputDir(str(folder)), list(range(6)), memory) == 30
        outputs[name] = _files(folder)
    assert outputs["sliced"] == outputs["in-memory"]
    crowded = [row for row, sha in sorted(shas.items()) if sha == hashlib.sha256(b"placeholder").hexdigest()]
    first = crowded[0]
    assert len(crowded) == 31 and first == 0
    reasons = {}
    for s in range(6):
        for r in pq.read_table(tmp_path / "sliced" / f"{s:05d}.parquet").to_pylist():
            reasons[r["row"]] = r["reason"]
    assert {row for row, reason in reasons.items() if reason} == {r for r in crowded if r != first}
    assert set(reasons[r] for r in crowded if r != first) == {f"duplicate (of {sample_key(first)})"}
