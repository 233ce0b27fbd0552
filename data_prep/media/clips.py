"""A segment of a video as an mp4 of its own, cut without re-encoding (`--clip-format mp4`).

The cut starts at the video keyframe at or before the segment's start (the first frame a decoder can start from
without the packets before it) and ends with the last packet a frame of the segment needs, so the clip always
covers the segment and may begin a little earlier: up to one keyframe interval. `Clip.start_s` says where, on the
source's timeline; a reader that wants the segment exactly skips `segment start - start_s` seconds of the clip.
The clip's timestamps start at 0 at that keyframe. Audio (the first audio stream) is kept or dropped by option;
its packets are cut to the same span. A codec that mp4 cannot hold as it is rejects the segment with the reason:
no re-encoding happens here.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

from data_prep.media.images import Reject

@dataclass(frozen=True)
class Clip:
    data: bytes
    """the mp4 file"""
    start_s: float
    """source time of the clip's first frame (a keyframe at or before the segment's start)"""
    end_s: float
    """source time at which the clip's last video frame ends"""
    has_audio: bool


def cut_clip(source, start_s: float, end_s: float, audio: bool) -> Clip:
    """[start_s, end_s] of `source` (a path or a binary file object) remuxed into an mp4; Reject when the
    container or codec does not allow it."""
    import av

    try:
        with av.open(source, mode="r") as src:
            return _remux(src, start_s, end_s, audio)
    except Reject:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise Reject(f"mp4 clip: {type(e).__name__}: {str(e)[:160]}") from None


def _remux(src, start_s: float, end_s: float, audio: bool) -> Clip:
    video = src.streams.video[0]
    sound = src.streams.audio[0] if audio and src.streams.audio else None
    vtb = video.time_base
    if start_s > 0:
        src.seek(int(start_s / float(vtb)), stream=video, backward=True)
    buf = io.BytesIO()
    with _open_output(buf) as out:
        ov = _copy_stream(out, video)
        oa = _copy_stream(out, sound) if sound is not None else None
        origin: Fraction | None = None  # source time of the first keyframe: the clip's time 0
        last_end = Fraction(0)
        num_video = num_audio = 0
        pending_audio = []  # audio demuxed before the keyframe that starts the clip is known
        for packet in src.demux([s for s in (video, sound) if s is not None]):
            if packet.pts is None or packet.dts is None or packet.size == 0:
                continue
            t = packet.pts * packet.time_base
            if packet.stream is video:
                if origin is None:
                    if not packet.is_keyframe:
                        continue  # decoding cannot start here
                    origin = t
                    for a in pending_audio:
                        num_audio += _mux_audio(out, oa, a, origin)
                    pending_audio = []
                # every packet decoded before the segment's last frame: decode order runs by dts
                if packet.dts * packet.time_base > end_s:
                    break
                last_end = max(last_end, t + (packet.duration or 0) * packet.time_base)
                _shift(packet, origin)
                packet.stream = ov
                out.mux(packet)
                num_video += 1
            elif t <= end_s:
                if origin is None:
                    pending_audio.append(packet)
                else:
                    num_audio += _mux_audio(out, oa, packet, origin)
        if num_video == 0:
            raise Reject(f"mp4 clip: no keyframe to start [{start_s:.3f}, {end_s:.3f}]s from")
    return Clip(buf.getvalue(), round(float(origin), 6), round(float(last_end), 6), num_audio > 0)


def _open_output(buf: io.BytesIO):
    import av

    # faststart would rewrite the file in place; the clip is small and read whole, so the index at the end is fine
    return av.open(buf, mode="w", format="mp4")


def _copy_stream(out, stream):
    try:
        return out.add_stream_from_template(stream)
    except ValueError as e:
        raise Reject(f"mp4 clip: the {stream.type} codec ({stream.codec_context.name}) cannot be copied into mp4: "
                     f"{str(e)[:120]}") from None


def _shift(packet, origin: Fraction) -> None:
    """Moves a packet onto the clip's timeline: time 0 at `origin` (dts may start just below 0 with B-frames;
    mp4 keeps that in its edit list)."""
    offset = round(origin / packet.time_base)
    packet.pts -= offset
    packet.dts -= offset


def _mux_audio(out, oa, packet, origin: Fraction) -> int:
    if packet.pts * packet.time_base < origin:
        return 0
    _shift(packet, origin)
    packet.stream = oa
    out.mux(packet)
    return 1
