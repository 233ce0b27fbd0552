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

import io
from dataclasses import dataclass
from typing import Any

from data_prep.shards.layout import frame_member, text_members
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


def decode_frames(data: bytes | None, vopts: VideoOptions, iopts: ImageOptions, start_s: float | None = None,
                  end_s: float | None = None) -> Frames:
    import av

    if not data:
        raise Reject("empty file")
    if data[:256].lstrip().lower().startswith(_HTML_MARKERS):
        raise Reject("not a video: HTML or XML document")
    start = start_s or 0.0
    end = min(end_s if end_s is not None else float("inf"), start + vopts.max_duration_s)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
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
            tb = float(stream.time_base)
            times, keys = [], []
            try:
                for packet in container.demux(stream):
                    if packet.pts is None or packet.size == 0:
                        continue
                    t = packet.pts * tb
                    if start - 1e-9 <= t <= end:
                        times.append(t)
                        keys.append(bool(packet.is_keyframe))
            except av.error.FFmpegError:
                pass  # a damaged tail: what demuxed so far counts, the shortfall check below decides
            order = sorted(range(len(times)), key=times.__getitem__)
            times, keys = [times[i] for i in order], [keys[i] for i in order]
            wanted = set(sample_timestamps(times, keys, vopts))
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            # no FFmpeg frame threads: the job already runs one worker process per core
            if start > 0:
                container.seek(int(start / tb), stream=stream, backward=True)
            kept: list[tuple[float, Any]] = []
            decoded_times: list[float] = []
            try:
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    t = frame.pts * tb
                    if t < start - 1e-9:
                        continue
                    if t > end:
                        break
                    decoded_times.append(t)
                    if t in wanted:
                        kept.append((t, frame))
            except av.error.FFmpegError:
                pass
            width, height = stream.codec_context.width, stream.codec_context.height
    except Reject:
        raise
    except av.error.InvalidDataError:
        raise Reject("not a video: unrecognised or broken container") from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise Reject(f"video decode error: {type(e).__name__}: {str(e)[:160]}") from None
    n = len(decoded_times)
    if n == 0:
        raise Reject("no frames decoded")
    whole = start_s is None and end_s is None and vopts.max_duration_s == float("inf")
    tick = 1.0 / header_rate if header_rate else 0.0
    span = decoded_times[-1] - decoded_times[0] + tick
    # compared on the timeline, not frame counts: variable-rate files legitimately have fewer frames than ticks
    if whole and header_s - span > max(_MAX_MISSING_FRAMES * tick, _MAX_MISSING_FRACTION * header_s):
        raise Reject(f"damaged video (header claims {header_frames} frames / {header_s:.2f}s, {n} frames over "
                     f"{span:.2f}s decode)")
    if not kept:
        raise Reject("no sampled frame decoded")
    fps = (n - 1) / (decoded_times[-1] - decoded_times[0]) if n > 1 and decoded_times[-1] > decoded_times[0] else 0.0
    duration = (decoded_times[-1] - decoded_times[0]) + (1.0 / fps if fps else 0.0)
    images, out_w, out_h = [], width, height
    for _, frame in kept:
        img = _resize_frame(frame, iopts)
        out_w, out_h = img.size
        images.append(encode(img, iopts))
    return Frames(images, [round(t, 6) for t, _ in kept], out_w, out_h, width, height, n, header_frames,
                  round(fps, 6), round(duration, 6))


def _resize_frame(frame, iopts: ImageOptions):
    """The image job's geometry, with the scaling itself done by FFmpeg's swscale (faster than Pillow here)."""
    w, h = frame.width, frame.height
    scale, canvas = target_geometry(w, h, iopts)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    img = frame.to_image(width=new_w, height=new_h) if (new_w, new_h) != (w, h) else frame.to_image()
    return resize(img, 1.0, canvas, new_w, new_h, iopts.background, iopts.resample)


def video_samples(opts: JobOptions, row: Row, rec: dict[str, Any], data: bytes | None, caption: str,
                  meta: dict[str, Any]) -> list[Sample]:
    fr = decode_frames(data, opts.video, opts.image, row.start_s, row.end_s)
    ext = opts.image.encode_format
    rec.update(width=fr.width, height=fr.height, original_width=fr.original_width,
               original_height=fr.original_height, bytes=sum(map(len, fr.images)),
               num_samples=len(fr.images) if opts.video.frames_as_samples else 1)
    meta.update(fps=fr.fps, duration=fr.duration_s, timestamps=fr.timestamps, num_frames=len(fr.images),
                num_decoded_frames=fr.num_decoded, header_frames=fr.header_frames, width=fr.width,
                height=fr.height, original_width=fr.original_width, original_height=fr.original_height,
                sampling=opts.video.frame_sampling)
    if row.start_s is not None or row.end_s is not None:
        meta.update(start=row.start_s, end=row.end_s)
    if not opts.video.frames_as_samples:
        frames = [(frame_member(i, ext), img) for i, img in enumerate(fr.images)]
        return [Sample(rec["key"], frames + text_members(caption, meta))]
    samples = []
    for i, (img, t) in enumerate(zip(fr.images, fr.timestamps)):
        key = f"{rec['key']}_{i:04d}"
        frame_meta = {**meta, "key": key, "video_key": rec["key"], "frame_index": i, "timestamp": t}
        frame_meta.pop("timestamps")
        samples.append(Sample(key, [(ext, img)] + text_members(caption, frame_meta)))
    return samples
