"""Resume after kill -9, job-array tasks + merge == local run, verify catching damage, repair of transient
failures, cross-shard dedup, and the pure plan functions at simulated scale."""
from __future__ import annotations

import csv
import os
import tarfile
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.cli import main
from data_prep.job.plan import resolve_task, shards_of_task, work_units
from data_prep.input.sources import Row
from tests.helpers.prep_corpus import CorpusServer, real_photos
from tests.helpers.prep_tables import dataset_digest, photo_table

REPO = Path(__file__).resolve().parents[1]
PHOTOS = "/usr/share/doc/opencv-doc"  # the tables name photos here: a folder the tests allow explicitly


def _shard(args: list[str]) -> None:
    main(["shard", "--no-progress", "--processes", "1", "--image-size", "64", "--local-root", PHOTOS, *args])


@pytest.fixture(scope="module")
def photos():
    paths = real_photos(limit=30)
    assert len(paths) >= 20, "opencv-doc examples missing (make install)"
    return paths + paths[:4]  # four exact duplicates across shards


def test_tasks_then_merge_equal_local_run_and_dedup(tmp_path, photos):
    table = photo_table(tmp_path, photos)
    _shard(["--input", str(table), "--output", str(tmp_path / "local"), "--samples-per-shard", "7",
            "--extra-cols", "source"])
    for t in (1, 0, 2):  # any order
        _shard(["--input", str(table), "--output", str(tmp_path / "array"), "--samples-per-shard", "7",
                "--extra-cols", "source", "--task-index", str(t), "--num-tasks", "3"])
    with pytest.raises(FileNotFoundError):
        main(["merge", str(tmp_path / "nothing")])
    main(["merge", str(tmp_path / "array")])
    assert dataset_digest(tmp_path / "local") == dataset_digest(tmp_path / "array")
    recs = pq.read_table(tmp_path / "local" / "samples.parquet").to_pylist()
    dups = [r for r in recs if (r["reason"] or "").startswith("duplicate")]
    assert sorted(r["row"] for r in dups) == [30, 31, 32, 33]  # the later copies lose, wherever they are
    assert sum(r["status"] == "ok" for r in recs) + sum(r["status"] == "rejected" for r in recs) == len(photos)
    assert main(["verify", str(tmp_path / "local")]) == 0


def test_merge_refuses_missing_tasks(tmp_path, photos):
    table = photo_table(tmp_path, photos[:10])
    _shard(["--input", str(table), "--output", str(tmp_path / "o"), "--samples-per-shard", "3",
            "--task-index", "0", "--num-tasks", "2"])
    with pytest.raises(ValueError, match="not all tasks"):
        main(["merge", str(tmp_path / "o")])


def test_slurm_env_selects_the_task(tmp_path, photos, monkeypatch):
    table = photo_table(tmp_path, photos[:10])
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    _shard(["--input", str(table), "--output", str(tmp_path / "o"), "--samples-per-shard", "3"])
    assert sorted(p.name for p in (tmp_path / "o").glob("*.tar")) == ["00001.tar", "00003.tar"]


def test_resume_after_kill_gives_identical_dataset(tmp_path):
    photos = real_photos(limit=40)
    table = photo_table(tmp_path, photos * 3)
    args = ["--input", str(table), "--samples-per-shard", "6", "--image-size", "128", "--no-dedup", "--local-root", PHOTOS]
    _shard([*args, "--output", str(tmp_path / "ref")])
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep", "shard", *args, "--output", str(out), "--processes", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*_stats.json"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*_stats.json")))
    assert 3 <= done < 20, done
    for tar in out.glob("*.tar"):  # whatever a reader can see is a complete tar
        with tarfile.open(tar) as t:
            assert len(t.getmembers()) % 3 == 0
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert not list(out.glob("*.tmp"))
    assert dataset_digest(out) == dataset_digest(tmp_path / "ref")


def test_rerun_with_other_settings_is_refused(tmp_path, photos):
    table = photo_table(tmp_path, photos[:3])
    _shard(["--input", str(table), "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--image-size=64, now --image-size=32"):
        main(["shard", "--input", str(table), "--output", str(tmp_path / "o"), "--image-size", "32", "--local-root", PHOTOS,
              "--no-progress", "--processes", "1"])


def test_verify_reports_damage(tmp_path, photos):
    table = photo_table(tmp_path, photos[:12])
    out = tmp_path / "o"
    _shard(["--input", str(table), "--output", str(out), "--samples-per-shard", "5"])
    assert main(["verify", str(out), "--decode-fraction", "1"]) == 0
    tar = out / "00001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    (out / "00002.tar").write_bytes((out / "00002.tar").read_bytes()[:1500])
    (out / "00000.tar.tmp").write_bytes(b"partial")
    from data_prep.maintenance.verify import verify
    problems = verify(str(out), decode_fraction=1.0).problems
    text = "\n".join(problems)
    assert "00001.tar: sha256 differs" in text
    assert "00002.tar" in text and "leftover temporary file 00000.tar.tmp" in text
    assert main(["verify", str(out)]) == 1


def test_repair_retries_only_transient_failures(tmp_path, photos):
    with CorpusServer({}) as srv:
        table = tmp_path / "in.csv"
        with open(table, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            w.writerows([[f"file://{photos[0]}", "a"], [srv.url("/flaky"), "b"], [srv.url("/status/404"), "c"],
                         [f"file://{photos[1]}", "d"]])
        out = tmp_path / "o"
        _shard(["--input", str(table), "--output", str(out), "--samples-per-shard", "2",
                "--allow-private-addresses", "--retries", "0"])
        assert (out / "sizes.json").read_text().count(": 1") == 2
        srv.heal()
        main(["repair", str(out), "--processes", "1", "--no-progress"])
        assert srv.hits["/status/404"] == 1  # permanent failure not retried
    recs = {r["row"]: r for r in pq.read_table(out / "samples.parquet").to_pylist()}
    assert [recs[i]["status"] for i in range(4)] == ["ok", "ok", "rejected", "ok"]
    assert recs[1]["shard"] == 2 and (out / "00002.tar").exists()
    assert main(["verify", str(out)]) == 0


def test_plan_is_pure_and_disjoint_at_scale():
    rows = [Row(index=i) for i in range(10_007)]
    for num_tasks in (1, 3, 8, 64):
        seen = []
        for t in range(num_tasks):
            units = list(work_units(iter(rows), 100, t, num_tasks))
            assert [s for s, _ in units] == shards_of_task(101, t, num_tasks)
            seen += [r.index for _, unit in units for r in unit]
        assert sorted(seen) == list(range(10_007))
    assert resolve_task(None, None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
                                     "SLURM_ARRAY_TASK_COUNT": "8"}) == (4, 8)
    assert resolve_task(None, None, {}) == (0, 1)
    with pytest.raises(ValueError, match="--task-index"):
        resolve_task(3, 3, {})
