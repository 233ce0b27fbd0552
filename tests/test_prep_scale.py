"""An array task reads its own share of a parquet input, not the whole table: the range plan as a pure function at
simulated scale, the reader's ranges against a full read, and array tasks + merge == one local run."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.cli import main
from data_prep.options import SourceOptions
from data_prep.job.plan import shards_of_task, task_row_ranges
from data_prep.input.sources import count_rows, read_rows
from tests.helpers.prep_corpus import CorpusServer, asymmetric_rgb, jpeg_bytes


def _owned_rows(start: int, stop: int, per: int, task: int, tasks: int) -> list[int]:
    return [i for i in range(start, stop) if (i // per) % tasks == task]


def test_task_row_ranges_match_the_shard_rule_at_scale():
    rng = random.Random(0)
    for _ in range(300):
        per, tasks = rng.randint(1, 50), rng.randint(1, 40)
        task = rng.randrange(tasks)
        start = rng.randint(0, 2000)
        stop = start + rng.randint(0, 700)
        got = [i for a, b in task_row_ranges(start, stop, per, task, tasks) for i in range(a, b)]
        assert got == _owned_rows(start, stop, per, task, tasks), (start, stop, per, task, tasks)
    # 100M rows in groups of 100k, 10,000 shards over 1,000 tasks: a task's share is 1/1000 of the rows
    per, tasks, group = 10_000, 1_000, 100_000
    wanted = [task_row_ranges(g, g + group, per, 7, tasks) for g in range(0, 100_000_000, group)]
    rows = sum(b - a for r in wanted for a, b in r)
    assert rows == len(shards_of_task(10_000, 7, tasks)) * per == 100_000
    assert sum(bool(r) for r in wanted) == 10  # row groups read out of 1,000


def test_parquet_ranges_yield_exactly_the_wanted_rows(tmp_path):
    table = tmp_path / "in.parquet"
    n = 1000
    pq.write_table(pa.table({"url": [f"http://h/{i}.jpg" for i in range(n)],
                             "caption": [f"caption {i}" for i in range(n)]}), table, row_group_size=64)
    opts = SourceOptions(input=str(table))
    assert count_rows(opts) == n
    full = list(read_rows(opts))
    for task, tasks, per in ((0, 3, 7), (2, 3, 7), (4, 5, 100), (0, 1, 1000)):
        got = list(read_rows(opts, lambda a, b: task_row_ranges(a, b, per, task, tasks)))
        want = [r for r in full if (r.index // per) % tasks == task]
        assert [(r.index, r.url, r.caption) for r in got] == [(r.index, r.url, r.caption) for r in want]
    assert count_rows(SourceOptions(input=str(tmp_path / "x.csv"), input_format="csv")) is None


def _digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and p.suffix in (".tar", ".parquet") or p.name in ("sizes.json", "manifest.json")}


def test_parquet_array_tasks_then_merge_equal_a_local_run(tmp_path):
    files = {f"/img{i}.jpg": jpeg_bytes(asymmetric_rgb(40 + i, 30)) for i in range(23)}
    with CorpusServer(files) as server:
        table = tmp_path / "in.parquet"
        pq.write_table(pa.table({"url": [server.url(p) for p in files], "caption": [f"p {p}" for p in files]}),
                       table, row_group_size=4)
        common = ["shard", "--no-progress", "--processes", "1", "--image-size", "32", "--input", str(table),
                  "--samples-per-shard", "3", "--allow-private-addresses"]
        main([*common, "--output", str(tmp_path / "local")])
        for task in (2, 0, 1):
            main([*common, "--output", str(tmp_path / "array"), "--task-index", str(task), "--num-tasks", "3"])
        main(["merge", str(tmp_path / "array")])
    assert _digest(tmp_path / "array") == _digest(tmp_path / "local")
    assert len([p for p in (tmp_path / "local").iterdir() if p.suffix == ".tar"]) == 8
