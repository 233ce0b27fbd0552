"""Issue 18: a process fetches ahead across shard boundaries and processes rows as their fetches complete, yet
writes exactly the shards an in-order run writes (row order, duplicates settled by row index)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.maintenance import merge
from data_prep.job import run
from data_prep.cli import build_parser, job_options, main
from data_prep.input.sources import read_rows
from tests.helpers.prep_corpus import asymmetric_rgb, jpeg_bytes, real_photos, shard_members
from tests.helpers.rude_server import RudeServer, reply

REPO = Path(__file__).resolve().parents[1]


def _table(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(json.dumps({"url": u, "caption": f"row {i}"}) + "\n" for i, u in enumerate(urls)))
    return path


def test_next_shard_is_fetched_while_a_slow_row_holds_the_current_one(tmp_path):
    events: list[str] = []  # in the order the server saw them
    lock = threading.Lock()
    jpeg = jpeg_bytes(asymmetric_rgb(64, 64))

    def route(name, delay):
        def send(conn, n):
            with lock:
                events.append(name)
            time.sleep(delay)
            reply(conn, 200, jpeg)
            with lock:
                events.append(f"done {name}")
        return send

    routes = {"/slow.jpg": route("slow", 1.5), **{f"/{i}.jpg": route(str(i), 0.0) for i in range(7)}}
    with RudeServer(routes) as srv:
        # shard 0: rows 0-3, the slow one last; shard 1: rows 4-7
        urls = [srv.url(f"/{i}.jpg") for i in range(3)] + [srv.url("/slow.jpg")] + \
            [srv.url(f"/{i}.jpg") for i in range(3, 7)]
        main(["shard", "--input", str(_table(tmp_path / "in.jsonl", urls)), "--output", str(tmp_path / "out"),
              "--processes", "1", "--samples-per-shard", "4", "--no-progress", "--allow-private-addresses",
              "--image-size", "32", "--no-dedup"])
    before_slow_done = set(events[:events.index("done slow")])
    assert {"3", "4", "5", "6"} <= before_slow_done, events  # shard 1 was fetched while shard 0 waited
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 4}


def test_out_of_order_completion_keeps_the_in_order_shard(tmp_path):
    photo = jpeg_bytes(asymmetric_rgb(80, 60))
    other = jpeg_bytes(asymmetric_rgb(60, 80))

    def serve(body, delay):
        def send(conn, n):
            time.sleep(delay)
            reply(conn, 200, body)
        return send

    # rows 0 and 2 hold the same bytes; row 0 arrives last, so the later copy is processed first
    routes = {"/first.jpg": serve(photo, 1.0), "/other.jpg": serve(other, 0.0), "/copy.jpg": serve(photo, 0.0)}
    with RudeServer(routes) as srv:
        urls = [srv.url("/first.jpg"), srv.url("/other.jpg"), srv.url("/copy.jpg")]
        main(["shard", "--input", str(_table(tmp_path / "in.jsonl", urls)), "--output", str(tmp_path / "out"),
              "--processes", "1", "--no-progress", "--allow-private-addresses", "--image-size", "32"])
    recs = {r["row"]: r for r in pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist()}
    assert [recs[i]["status"] for i in range(3)] == ["ok", "ok", "rejected"]
    assert recs[2]["reason"] == "duplicate (of 000000000)" and recs[2]["width"] is None
    assert recs[0]["original_width"] == 80 and recs[0]["sha256"] == recs[2]["sha256"]
    assert list(shard_members(tmp_path / "out")) == ["000000000", "000000001"]


def test_web_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/bench_prep_web.py", "--rows", "24", "--skip-img2dataset",
                          "--fail-share", "0.2", "--slow-share", "0.05", "--slow-s", "1", "--latency-ms", "20"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["identical_to_local"] is True
    assert result["web_rows"] == {"input": 24, "ok": 24, "rejected": 0, "reasons": {}}
    seen = result["politeness"]["web"]
    assert seen["early_retries"] == 0 and seen["status"].get("429", 0) + seen["status"].get("503", 0) > 0
    assert max(seen["max_active"].values()) <= 2 * 8  # 2 processes x --max-per-host 8


def test_input_failure_with_workers_finishes_the_shards_handed_out(tmp_path):
    photos = real_photos(limit=12)
    table = _table(tmp_path / "in.jsonl", photos * 8)  # more than the 64 rows the plan looks at first
    out = tmp_path / "out"
    opts = job_options(build_parser().parse_args(
        ["shard", "--input", str(table), "--output", str(out), "--samples-per-shard", "4", "--image-size", "32",
         "--local-root", "/usr/share/doc/opencv-doc", "--no-dedup"]))

    def dies_at_row_81():
        for row in read_rows(opts.source):
            if row.index == 81:
                raise RuntimeError("input lost")
            yield row

    with pytest.raises(RuntimeError, match="input lost"):
        run.run_task(opts, processes=2, rows=dies_at_row_81(), progress=False, log=lambda _: None)
    # rows 0-79 made 20 whole units before the failure: every one of them was built, none left half-done
    assert sorted(p.name for p in out.glob("*_stats.json")) == [f"{i:05d}_stats.json" for i in range(20)]
    assert not list(out.glob("*.tmp*"))


def test_a_subset_of_rows_with_gaps_in_their_indices_is_merged_whole(tmp_path):
    # rows handed to run_task may be a subset of a table (bench_filter_gain's perfect filter): shards go by row
    # index, so rows 8-11 land in shard 2 of a 6-row input, and the merge must not stop at shard 1
    photos = real_photos(3)
    table = _table(tmp_path / "in.jsonl", photos * 4)
    out = tmp_path / "out"
    opts = job_options(build_parser().parse_args(
        ["shard", "--input", str(table), "--output", str(out), "--samples-per-shard", "4", "--image-size", "32",
         "--local-root", "/usr/share/doc/opencv-doc", "--no-dedup"]))
    rows = [r for r in read_rows(opts.source) if r.index % 2 == 0]  # 6 of 12 rows: indices 0, 2, ..., 10
    run.run_task(opts, rows=iter(rows), progress=False, log=lambda _: None)
    manifest = merge.merge(str(out))
    assert manifest["num_samples"] == manifest["num_input_rows"] == 6
    assert manifest["num_shards"] == 3

