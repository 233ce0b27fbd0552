"""Videos cut into segments, each one input row of its own: HowTo100M's caption file, subtitles beside a video,
clip tables, fixed strides and scene cuts.

The reader's rows are videos; `segment_rows` turns each into one row per segment (in time order), numbered on
in input order, so the job's rules (row index -> key and shard, task of a shard, one manifest record per row)
hold unchanged: a row's key is the position of its segment in the stream of (video, segment index) pairs, and
`{key}.json` names the video (`video_id`, `video_index`: its row in the video table) and the segment
(`segment_index`, `start`, `end`, `source_segments` when merged). Every segment is accounted for: a dropped one
(`[Music]`) is a rejected row with its reason, a video that cannot be cut (no captions, an unreadable subtitle
file) one rejected row.

Captions and subtitles come from strangers: files are read up to a size cap, a subtitle path follows the local
file rules of the videos (`data_prep.input.access`), a caption entry must be parallel lists of finite numbers and
strings, and a video has at most --max-segments segments.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

from data_prep.input.access import is_local, local_access, resolve_local
from data_prep.media.images import Reject
from data_prep.options import SegmentOptions, SourceOptions

SUBTITLE_SUFFIXES = (".vtt", ".srt")
# a text of nothing but these is not speech: [Music], (applause), ♪ ♪, >> (speaker change), punctuation
_MARKUP = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>|[♪♫#*>\-.,!?…\s]")


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float
    text: str | None
    sources: tuple[int, ...] = ()
    """Indices of the segments (as the source lists them) merged into this one."""
    reason: str | None = None
    """Why the segment is rejected; None when kept."""


def is_segmenting(opts: SourceOptions) -> bool:
    seg = opts.segments
    return opts.input_format in ("howto100m", "clips") or bool(seg.subtitles or seg.subtitle_col or seg.segment)


def non_speech(text: str | None) -> bool:
    return not _MARKUP.sub("", text or "")


def prepare(raw: list[tuple[float, float, str | None]], opts: SegmentOptions) -> list[Segment]:
    """Pure: a video's segments as listed (start, end, text) -> its clips and rejects, in time order.

    Segments whose end is not after their start, and (with drop_non_speech) those without speech, are rejects.
    The kept ones are merged in time order while a clip is shorter than min_clip_s and the merge stays within
    max_clip_s; a single segment longer than max_clip_s is cut to its first max_clip_s seconds."""
    order = sorted(range(len(raw)), key=lambda i: (raw[i][0], raw[i][1], i))
    out: list[Segment] = []
    clip: Segment | None = None
    for i in order:
        start, end, text = raw[i]
        if not end > start:
            out.append(Segment(start, end, text, (i,), f"segment ends before it starts ({start} >= {end})"))
            continue
        if text is not None and opts.drop_non_speech and non_speech(text):
            why = "empty caption" if not (text or "").strip() else f"non-speech caption ({text.strip()[:40]})"
            out.append(Segment(start, end, text, (i,), why))
            continue
        if clip is not None and clip.end_s - clip.start_s < opts.min_clip_s and end - clip.start_s <= opts.max_clip_s:
            texts = [t for t in (clip.text, text) if t]
            clip = Segment(clip.start_s, max(clip.end_s, end), " ".join(texts) if texts or text is not None else None,
                           clip.sources + (i,))
            continue
        if clip is not None:
            out.append(clip)
        clip = Segment(start, min(end, start + opts.max_clip_s), text, (i,))
    if clip is not None:
        out.append(clip)
    return sorted(out, key=lambda s: (s.start_s, s.sources))


def segment_rows(opts: SourceOptions, videos: Iterator[Any]) -> Iterator[Any]:
    """One row per segment of each video row (`sources.Row`, whose reader calls this: each segment's row is a
    copy of its video's), numbered on from 0 in input order (see the module docstring)."""
    seg = opts.segments
    captions = CaptionIndex(seg.caption_json, seg.max_caption_json_bytes) if opts.input_format == "howto100m" \
        else None
    try:
        yield from _segment_rows(opts, videos, captions)
    finally:
        if captions is not None:
            captions.close()


def _segment_rows(opts: SourceOptions, videos: Iterator[Any], captions: CaptionIndex | None) -> Iterator[Any]:
    seg = opts.segments
    roots, base = local_access(opts, _table_format(opts))
    clip_counts: dict[str, int] = {}
    index = 0
    for video in videos:
        video_id = _video_id(video, seg)
        if opts.input_format == "clips":  # one row, one clip: its index among the clips of the same video
            n = clip_counts[video.url or ""] = clip_counts.get(video.url or "", -1) + 1
            extra = {**video.extra, "video_id": video_id, "segment_index": n}
            reason = video.skip_reason
            if reason is None and seg.drop_non_speech and isinstance(video.caption, str) and non_speech(video.caption):
                reason = f"non-speech caption ({video.caption.strip()[:40]})" if video.caption.strip() else \
                    "empty caption"
            yield dataclasses.replace(video, index=index, extra=extra, skip_reason=reason)
            index += 1
            continue
        try:
            if video.skip_reason:
                raise Reject(video.skip_reason)
            raw = _raw_segments(video, video_id, captions, opts, roots, base)
            if len(raw) > seg.max_segments:
                raise Reject(f"{len(raw)} segments, more than --max-segments {seg.max_segments}")
            segments = prepare(raw, seg)
            if not segments:
                raise Reject("no segments")
        except Reject as r:
            yield dataclasses.replace(video, index=index, caption=None, skip_reason=r.reason,
                                      extra={**video.extra, "video_id": video_id, "video_index": video.index})
            index += 1
            continue
        for n, s in enumerate(segments):
            extra = {**video.extra, "video_id": video_id, "video_index": video.index, "segment_index": n}
            if len(s.sources) > 1:
                extra["source_segments"] = list(s.sources)
            yield dataclasses.replace(video, index=index, caption=s.text if s.text is not None else video.caption,
                                      extra=extra, start_s=round(s.start_s, 6), end_s=round(s.end_s, 6),
                                      skip_reason=s.reason)
            index += 1


def video_columns(opts: SourceOptions) -> SourceOptions:
    """The options the video table is read with: its own format, the id column kept, no caption column where
    the captions come from elsewhere."""
    out = dataclasses.replace(opts, input_format=_table_format(opts), segments=SegmentOptions())
    if opts.input_format == "howto100m":
        out = dataclasses.replace(out, caption_col=None,
                                  extra_cols=tuple(dict.fromkeys(opts.extra_cols + (opts.segments.video_id_col,))))
    elif opts.input_format == "clips":
        renamed = {"url_col": "video", "start_col": "start", "end_col": "end"}
        out = dataclasses.replace(out, **{k: v for k, v in renamed.items()
                                           if getattr(opts, k) == SourceOptions.__dataclass_fields__[k].default})
    elif opts.segments.subtitles or opts.segments.subtitle_col:
        out = dataclasses.replace(out, caption_col=None)
        if opts.segments.subtitle_col:
            out = dataclasses.replace(out, extra_cols=tuple(dict.fromkeys(opts.extra_cols +
                                                                          (opts.segments.subtitle_col,))))
    return out


def _table_format(opts: SourceOptions) -> str:
    if opts.input_format not in ("howto100m", "clips"):
        return opts.input_format
    from data_prep.input.formats import detect_format
    return detect_format(opts.input)


def _video_id(video: Any, seg: SegmentOptions) -> str | None:
    value = video.extra.get(seg.video_id_col)
    if value is not None:
        return str(value)
    if not video.url:
        return None
    return os.path.splitext(os.path.basename(video.url.split("?", 1)[0]))[0] or None


def _raw_segments(video: Any, video_id: str | None, captions: CaptionIndex | None, opts: SourceOptions,
                  roots: tuple[str, ...], base: str | None) -> list[tuple[float, float, str | None]]:
    seg = opts.segments
    if captions is not None:
        entry = captions.get(video_id)
        if entry is None:
            raise Reject(f"no captions for video id {str(video_id)[:60]!r} in --caption-json")
        return _caption_entry(entry, video_id)
    if not video.url:
        raise Reject("missing url")
    if not is_local(video.url):
        raise Reject("subtitles, strides and scene cuts need a local video file")
    path = resolve_local(video.url, roots, base)
    if seg.subtitles or seg.subtitle_col:
        named = video.extra.pop(seg.subtitle_col, None) if seg.subtitle_col else None
        if seg.subtitle_col and named:
            sub = resolve_local(str(named), roots, base)
        else:
            stem = os.path.splitext(video.url.removeprefix("file://"))[0]
            found = [stem + s for s in SUBTITLE_SUFFIXES if os.path.lexists(os.path.join(base or "", stem + s))]
            if not found:
                raise Reject("no subtitle file beside the video (.vtt or .srt)")
            sub = resolve_local(found[0], roots, base)
        return read_subtitles(sub, seg.max_subtitle_bytes)
    if seg.stride_s is not None:
        return stride_segments(video_duration_s(path), seg.stride_s)
    return scene_segments(path, seg.scene_threshold)


class CaptionIndex:
    """--caption-json streamed (ijson) into a temporary SQLite table of video id -> entry, so that the videos of
    the table can look theirs up in any order while memory holds one entry at a time: HowTo100M's file is a
    ~1.3 GB object of 1.2M entries, in no particular order. The table on disk is about the size of the file;
    it is removed on close. An entry is checked when its video asks for it (a bad one rejects that video)."""

    def __init__(self, path: str, max_bytes: int):
        import sqlite3
        import tempfile

        import ijson

        size = os.path.getsize(path)
        if size > max_bytes:
            raise ValueError(f"--caption-json {path!r}: {size} bytes, more than --max-caption-json-bytes "
                             f"{max_bytes}")
        self._dir = tempfile.TemporaryDirectory(prefix="plait-captions-")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "captions.sqlite"))
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE captions (video_id TEXT PRIMARY KEY, entry TEXT)")
        try:
            with open(path, "rb") as f:
                if f.read(64).lstrip()[:1] != b"{":
                    raise ValueError(f"--caption-json {path!r}: expected an object mapping video ids to "
                                     "start/end/text lists")
                f.seek(0)
                # a repeated id keeps its last entry, as json.load would
                self._db.executemany("INSERT OR REPLACE INTO captions VALUES (?, ?)",
                                     ((k, json.dumps(v)) for k, v in ijson.kvitems(f, "", use_float=True)))
            self._db.commit()
        except ijson.JSONError as e:
            self.close()
            raise ValueError(f"--caption-json {path!r}: invalid JSON ({str(e)[:120]})") from None
        except BaseException:
            self.close()
            raise

    def get(self, video_id: str | None) -> Any:
        """The entry of `video_id`, or None when the file has none (an entry of null is treated alike)."""
        if video_id is None:
            return None
        row = self._db.execute("SELECT entry FROM captions WHERE video_id = ?", (video_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


def _caption_entry(entry: Any, video_id: str | None) -> list[tuple[float, float, str | None]]:
    """One video's caption entry, checked: parallel lists start, end, text of finite seconds and strings."""
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), list) for k in ("start", "end", "text")):
        raise Reject("caption entry is not an object of start, end and text lists")
    starts, ends, texts = entry["start"], entry["end"], entry["text"]
    if not len(starts) == len(ends) == len(texts):
        raise Reject(f"caption entry lists differ in length (start {len(starts)}, end {len(ends)}, "
                     f"text {len(texts)})")
    for values in (starts, ends):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in values):
            raise Reject("caption entry has a start or end that is not a number of seconds >= 0")
    if not all(isinstance(t, str) for t in texts):
        raise Reject("caption entry has a text that is not a string")
    return [(float(a), float(b), t) for a, b, t in zip(starts, ends, texts)]


def read_subtitles(path: str, max_bytes: int) -> list[tuple[float, float, str | None]]:
    """Cues of a .vtt (webvtt-py) or .srt (srt) file, (start, end, text); a bad file rejects its video."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise Reject(f"unreadable subtitle file: {type(e).__name__}") from None
    if len(data) > max_bytes:
        raise Reject(f"subtitle file larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Reject("subtitle file is not valid UTF-8") from None
    try:
        if path.lower().endswith(".srt"):
            import srt
            return [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in srt.parse(text)]
        import webvtt
        return [(_vtt_seconds(c.start), _vtt_seconds(c.end), c.text) for c in webvtt.from_string(text)]
    except Exception as e:  # both parsers raise their own error types on malformed files
        raise Reject(f"malformed subtitle file ({type(e).__name__}: {str(e)[:100]})") from None


def _vtt_seconds(timestamp: str) -> float:
    """webvtt-py keeps cue times as text (HH:MM:SS.mmm or MM:SS.mmm)."""
    parts = [float(p) for p in timestamp.replace(",", ".").split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def stride_segments(duration_s: float, stride_s: float) -> list[tuple[float, float, None]]:
    """Pure: [0, stride), [stride, 2 stride), ... up to the duration, the last one shorter."""
    n = max(1, math.ceil(duration_s / stride_s - 1e-9)) if duration_s > 0 else 0
    return [(round(i * stride_s, 6), round(min((i + 1) * stride_s, duration_s), 6), None) for i in range(n)]


def video_duration_s(path: str) -> float:
    """The span of the video packets' timestamps (demuxed, not decoded); never the container's claim."""
    import av
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise Reject("no video stream")
            stream = container.streams.video[0]
            tb, rate = float(stream.time_base), float(stream.average_rate or 0)
            times = [p.pts * tb for p in container.demux(stream) if p.pts is not None and p.size]
    except av.error.FFmpegError as e:
        raise Reject(f"not a video: {type(e).__name__}") from None
    if not times:
        raise Reject("no frames")
    return max(times) - min(times) + (1.0 / rate if rate else 0.0)


def scene_segments(path: str, threshold: float) -> list[tuple[float, float, None]]:
    """Scenes by PySceneDetect's ContentDetector, decoded through its PyAV backend (the same FFmpeg as the frames).
    A video without a cut is one scene."""
    import av
    from scenedetect import ContentDetector, SceneManager
    from scenedetect.backends.pyav import VideoStreamAv
    try:
        video = VideoStreamAv(path, suppress_output=True)
        manager = SceneManager()
        manager.add_detector(ContentDetector(threshold=threshold))
        manager.detect_scenes(video)
        scenes = manager.get_scene_list(start_in_scene=True)
    except (av.error.FFmpegError, OSError) as e:
        raise Reject(f"not a video: {type(e).__name__}") from None
    return [(round(a.seconds, 6), round(b.seconds, 6), None) for a, b in scenes]
