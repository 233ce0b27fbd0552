"""Video rows -> frame samples with PyAV; the rest of the job (fetch, resize/encode settings, manifests, atomic
shards, resume, verify, distribution) is the image job's, called from `worker.build_shard`.

Two passes over the bytes: (1) demux only, which reads every video packet's timestamp without decoding (cheap)
and tells which frames really exist in the time window; the sampling strategy picks timestamps from those;
(2) decode, counting the frames that actually decode and keeping the picked ones. Container headers (frame count,
duration) are recorded but never used for sampling: some lie. A file whose header claims clearly more frames than
decode is rejected as damaged, like empty files, non-video bytes (HTML, a 404 page), audio-only files and codecs
FFmpeg cannot decode; none of them crash the job or reach a tar.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from typing import Any

from data_prep.shards.layout import CLIP_MEMBER, frame_member, text_members
from data_prep.options import ImageOptions, JobOptions, VideoOptions
from data_prep.media.images import Reject, encode, resize, target_geometry
from data_prep.input.sources import Row
from data_prep.shards.writer import Sample

_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")
# a header claiming this much more than decodes marks a damaged file (a few frames of slack: containers round)
_MAX_MISSING_FRACTION, _MAX_MISSING_FRAMES = 0.1, 2


@dataclass
class Frames:
    images: list[bytes]
    timestamps: list[float]
    width: int
    height: int
    original_width: int
    original_height: int
    num_decoded: int
    header_frames: int
    fps: float
    duration_s: float
    rotation: int = 0
    """Clockwise degrees the frames were turned by, from the stream's display matrix."""


def sample_timestamps(times: list[float], keyframe: list[bool], opts: VideoOptions) -> list[float]:
    """Pure: which of the available frame times (sorted, seconds) to keep under the sampling strategy."""
    n = len(times)
    if n == 0:
        return []
    if opts.frame_sampling == "uniform":
        k = min(opts.num_frames, n)
        return [times[int((i + 0.5) * n / k)] for i in range(k)]
    if opts.frame_sampling == "keyframes":
        picked = [t for t, key in zip(times, keyframe) if key]
    else:  # fps: the first frame at or after each tick of the clock
        picked, j, tick = [], 0, times[0]
        while j < n:
            while j < n and times[j] < tick - 1e-9:
                j += 1
            if j < n:
                picked.append(times[j])
                j += 1
            tick += 1.0 / opts.fps
    if len(picked) > opts.max_frames:  # thin out evenly rather than truncating the end
        picked = [picked[int(i * len(picked) / opts.max_frames)] for i in range(opts.max_frames)]
    return picked


@dataclass(frozen=True)
class LocalVideo:
    """A local video file read by seeking, never whole: a segment of a 2-hour file costs its own stretch."""
    path: str


def decode_frames(data: bytes | LocalVideo | None, vopts: VideoOptions, iopts: ImageOptions,
                  start_s: float | None = None, end_s: float | None = None) -> Frames:
    """The sampled frames of [start_s, end_s] (the whole video without them), resized and encoded; Reject for a
    file or a stretch that does not decode."""
    import av

    head = _head(data)
    if not head:
        raise Reject("empty file")
    if head.lstrip().lower().startswith(_HTML_MARKERS):
        raise Reject("not a video: HTML or XML document")
    start = start_s or 0.0
    end = min(end_s if end_s is not None else float("inf"), start + vopts.max_duration_s)
    window = start_s is not None or end_s is not None
    try:
        with _open_container(data) as (container, fresh):
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise Reject(f"no video stream (streams: {', '.join(kinds)})")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise Reject(f"unsupported codec (no decoder for the video stream of this {container.format.name} "
                             "file)")
            header_frames = int(stream.frames or 0)
            header_rate = float(stream.average_rate or 0) or None
            header_s = header_frames / header_rate if header_frames and header_rate else \
                (float(stream.duration * stream.time_base) if stream.duration else 0.0)
            times, keys = _index_window(container, stream, start, end, fresh)
            if window and not times:
                raise Reject(f"no frames in segment [{start:.3f}, {end:.3f}]s (past the end of the video?)")
            wanted = set(sample_timestamps(times, keys, vopts))
            kept, decoded_times, rotation = _decode_window(container, stream, start, end, wanted, len(times))
            width, height = stream.codec_context.width, stream.codec_context.height
    except Reject:
        raise
    except av.error.InvalidDataError:
        raise Reject("not a video: unrecognised or broken container") from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise Reject(f"video decode error: {type(e).__name__}: {str(e)[:160]}") from None
    n = len(decoded_times)
    # a segment: the frames its packets promise against those that decode (a damaged stretch of a long video
    # rejects the segments it touches, not the video)
    missing = len(times) - n
    if window and missing > max(_MAX_MISSING_FRAMES, _MAX_MISSING_FRACTION * len(times)):
        raise Reject(f"damaged stretch ({missing} of {len(times)} frames in [{start:.3f}, {end:.3f}]s do not "
                     "decode)")
    if n == 0:
        raise Reject("no frames decoded")
    tick = 1.0 / header_rate if header_rate else 0.0
    span = decoded_times[-1] - decoded_times[0] + tick
    # compared on the timeline, not frame counts: variable-rate files legitimately have fewer frames than ticks
    whole = not window and vopts.max_duration_s == float("inf")
    if whole and header_s - span > max(_MAX_MISSING_FRAMES * tick, _MAX_MISSING_FRACTION * header_s):
        raise Reject(f"damaged video (header claims {header_frames} frames / {header_s:.2f}s, {n} frames over "
                     f"{span:.2f}s decode)")
    if not kept:
        raise Reject("no sampled frame decoded")
    fps = (n - 1) / (decoded_times[-1] - decoded_times[0]) if n > 1 and decoded_times[-1] > decoded_times[0] else 0.0
    duration = (decoded_times[-1] - decoded_times[0]) + (1.0 / fps if fps else 0.0)
    if rotation % 180:
        width, height = height, width
    images, out_w, out_h = [], width, height
    for _, frame in kept:
        img = _resize_frame(frame, iopts, rotation)
        out_w, out_h = img.size
        images.append(encode(img, iopts))
    return Frames(images, [round(t, 6) for t, _ in kept], out_w, out_h, width, height, n, header_frames,
                  round(fps, 6), round(duration, 6), rotation)


def _clip(data: bytes | LocalVideo, vopts: VideoOptions, row: Row, rec: dict[str, Any],
          meta: dict[str, Any]) -> bytes:
    """The row's segment (the whole video without one, up to --max-duration) as an mp4 cut without re-encoding;
    its keyframe-adjusted span goes into the sample's JSON."""
    from data_prep.media.clips import cut_clip

    start = row.start_s or 0.0
    end = min(row.end_s if row.end_s is not None else float("inf"), start + vopts.max_duration_s)
    clip = cut_clip(data.path if isinstance(data, LocalVideo) else io.BytesIO(data), start, end, vopts.clip_audio)
    meta.update(clip_start=clip.start_s, clip_end=clip.end_s, clip_audio=clip.has_audio)
    rec["bytes"] += len(clip.data)
    return clip.data


_open_video: list = []
"""[(path, size, mtime_ns), container] of the local video this process read last, kept open: the segments of
one video come in a row, and opening the container (probing its streams) cost ~5 ms of a ~75 ms 4 s segment."""


@contextlib.contextmanager
def _open_container(data: bytes | LocalVideo):
    """(container, fresh): a new container for bytes; for a local file the one kept open when it is the same file
    (path, size and mtime), else a new one that replaces it. Every pass seeks before it reads, and a seek flushes
    the decoder, so what a segment decodes does not depend on what was read before it. A pass that fails closes
    the kept container: its state is unknown."""
    import av

    if not isinstance(data, LocalVideo):
        with av.open(io.BytesIO(data), mode="r") as container:
            yield container, True
        return
    ident = _identity(data.path)
    fresh = not (_open_video and _open_video[0] == ident)
    if fresh:
        _close_open_video()
        _open_video[:] = [ident, av.open(data.path, mode="r")]
    try:
        yield _open_video[1], fresh
    except Reject:
        raise  # the passes ended normally: the next one seeks
    except BaseException:
        _close_open_video()
        raise


def _identity(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


def _close_open_video() -> None:
    if _open_video:
        _open_video.pop().close()
        _open_video.clear()


def _head(data: bytes | LocalVideo | None) -> bytes:
    if data is None:
        return b""
    if isinstance(data, LocalVideo):
        try:
            if _open_video and _open_video[0] == _identity(data.path):
                return b"\0"  # the file kept open: its head was checked when it was opened
        except OSError:
            pass  # said below
        try:
            with open(data.path, "rb") as f:
                return f.read(256)
        except OSError as e:
            raise Reject(f"unreadable file: {type(e).__name__}") from None
    return data[:256]


_PAST_END_PACKETS = 32
"""Packets read past a window's end before the index stops: decode order runs ahead of time order (B-frames)."""


def _seek(container, stream, start: float, fresh: bool) -> None:
    """To the keyframe at or before start (decoding from there reaches every frame of the window); back to the
    file's beginning for a window that starts there, unless the container was just opened (it is there)."""
    if start > 0:
        container.seek(int(start / float(stream.time_base)), stream=stream, backward=True)
    elif not fresh:
        container.seek(0, backward=True)


def _index_window(container, stream, start: float, end: float, fresh: bool) -> tuple[list[float], list[bool]]:
    """Pass 1, demux only: the times (sorted) and keyframe flags of the video packets in [start, end]."""
    import av

    tb = float(stream.time_base)
    _seek(container, stream, start, fresh)
    times, keys, past = [], [], 0
    try:
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            t = packet.pts * tb
            if start - 1e-9 <= t <= end:
                times.append(t)
                keys.append(bool(packet.is_keyframe))
            elif t > end:
                past += 1
                if past > _PAST_END_PACKETS:
                    break
    except av.error.FFmpegError:
        pass  # a damaged tail: what demuxed so far counts, the shortfall checks decide
    order = sorted(range(len(times)), key=times.__getitem__)
    return [times[i] for i in order], [keys[i] for i in order]


def _decode_window(container, stream, start: float, end: float, wanted: set[float], num_indexed: int):
    """Pass 2: decodes [start, end] packet by packet, keeping the frames at `wanted` times. A packet that does not
    decode costs its frame, not the pass, so a damaged stretch shows as frames missing where it is.

    Stops as soon as the window's `num_indexed` frames (pass 1's count) have all decoded: reading on to make sure
    would decode up to `_PAST_END_PACKETS` frames past the end of every segment (a third more work on 4 s
    segments of a 25 fps video). Only a window whose frames fall short reads on that far."""
    import av

    tb = float(stream.time_base)
    _seek(container, stream, start, fresh=False)
    kept: list[tuple[float, Any]] = []
    decoded: list[float] = []
    rotation, past = 0, 0
    # no FFmpeg frame threads: the job already runs one worker process per core
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                continue
            for frame in frames:
                if frame.pts is None:
                    continue
                t = frame.pts * tb
                if t < start - 1e-9:
                    continue
                if t > end:
                    past += 1
                    continue
                decoded.append(t)
                if t in wanted:
                    rotation = _rotation(frame)
                    kept.append((t, frame))
            if past > _PAST_END_PACKETS or (num_indexed and len(decoded) >= num_indexed):
                break
    except av.error.FFmpegError:
        pass
    decoded.sort()
    kept.sort(key=lambda tf: tf[0])
    return kept, decoded, rotation


def _rotation(frame) -> int:
    """Clockwise degrees a player turns the frame (the display matrix side data), a multiple of 90."""
    # PyAV's rotation is the display matrix's counter-clockwise angle, as FFmpeg's av_display_rotation_get
    return round(-float(getattr(frame, "rotation", 0) or 0) / 90) % 4 * 90


def _resize_frame(frame, iopts: ImageOptions, rotation: int = 0):
    """The image job's geometry on the frame as displayed (turned by `rotation`, as EXIF orientation is for
    photos), with the scaling itself done by FFmpeg's swscale (faster than Pillow here)."""
    from PIL import Image

    w, h = frame.width, frame.height
    shown_w, shown_h = (h, w) if rotation % 180 else (w, h)
    scale, canvas = target_geometry(shown_w, shown_h, iopts)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    img = frame.to_image(width=new_w, height=new_h) if (new_w, new_h) != (w, h) else frame.to_image()
    if rotation:
        img = img.transpose({90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
                             270: Image.Transpose.ROTATE_90}[rotation])
    new_w, new_h = img.size
    return resize(img, 1.0, canvas, new_w, new_h, iopts.background, iopts.resample)


def video_samples(opts: JobOptions, row: Row, rec: dict[str, Any], data: bytes | LocalVideo | None, caption: str,
                  meta: dict[str, Any]) -> list[Sample]:
    fr = decode_frames(data, opts.video, opts.image, row.start_s, row.end_s)
    ext = opts.image.encode_format
    rec.update(width=fr.width, height=fr.height, original_width=fr.original_width,
               original_height=fr.original_height, bytes=sum(map(len, fr.images)),
               num_samples=len(fr.images) if opts.video.frames_as_samples else 1)
    meta.update(fps=fr.fps, duration=fr.duration_s, timestamps=fr.timestamps, num_frames=len(fr.images),
                num_decoded_frames=fr.num_decoded, header_frames=fr.header_frames, width=fr.width,
                height=fr.height, original_width=fr.original_width, original_height=fr.original_height,
                sampling=opts.video.frame_sampling, **({"rotation": fr.rotation} if fr.rotation else {}))
    if row.start_s is not None or row.end_s is not None:
        meta.update(start=row.start_s, end=row.end_s)
    if not opts.video.frames_as_samples:
        members = [(frame_member(i, ext), img) for i, img in enumerate(fr.images)]
        if opts.video.clip_format == "mp4":
            members.append((CLIP_MEMBER, _clip(data, opts.video, row, rec, meta)))
        return [Sample(rec["key"], members + text_members(caption, meta))]
    samples = []
    for i, (img, t) in enumerate(zip(fr.images, fr.timestamps)):
        key = f"{rec['key']}_{i:04d}"
        frame_meta = {**meta, "key": key, "video_key": rec["key"], "frame_index": i, "timestamp": t}
        frame_meta.pop("timestamps")
        samples.append(Sample(key, [(ext, img)] + text_members(caption, frame_meta)))
    return samples
