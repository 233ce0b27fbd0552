"""EXIF orientation x Pillow mode x transparency against `ImageOps.exif_transpose` + compositing, and the memory
a worker spends decoding images that are small on disk but large in pixels (issue 15, items 4 and 7)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_prep.options import ImageOptions
from data_prep.media.images import Reject, process_image
from tests.helpers.prep_corpus import asymmetric_rgb

REPO = Path(__file__).resolve().parents[1]
BACKGROUND = (0, 200, 0)
_INVERSE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
            7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def _upright(mode: str, transparent: bool) -> Image.Image:
    """64x40, asymmetric, in `mode`; with `transparent`, the bottom-right block is see-through."""
    rgb = asymmetric_rgb(64, 40)
    arr = np.asarray(rgb).copy()
    arr[28:, 44:] = (10, 20, 30)  # the colour the transparency key names (exact in every mode below)
    rgb = Image.fromarray(arr)
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), np.uint16) * 257 + 3  # 16-bit values that do not map 1:1 to 8 bits
        img = Image.fromarray(grey.astype(np.uint16))
        if transparent:
            img.info["transparency"] = int(grey[30, 50])
        return img
    if mode in ("RGBA", "LA"):
        img = rgb.convert(mode)
        alpha = np.full((40, 64), 255, np.uint8)
        if transparent:
            alpha[28:, 44:] = 0
            alpha[:6, :6] = 100  # half transparent: the composite must blend, not cut
        img.putalpha(Image.fromarray(alpha))
        return img
    if mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        if transparent:
            img.info["transparency"] = img.getpixel((50, 30))
        return img
    img = rgb.convert(mode)
    if transparent:  # a tRNS colour key on an RGB or L PNG
        img.info["transparency"] = img.getpixel((50, 30))
    return img


def _encode(img: Image.Image, fmt: str, orientation: int) -> bytes:
    stored = img if orientation == 1 else img.transpose(_INVERSE[orientation])
    stored.info = dict(img.info)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    kw = {"exif": exif.tobytes()}
    if "transparency" in img.info:
        kw["transparency"] = img.info["transparency"]
    if fmt == "JPEG":
        kw["quality"] = 95
    stored.save(buf, fmt, **kw)
    return buf.getvalue()


def _reference(data: bytes) -> np.ndarray:
    """What a careful reader sees: Pillow's own orientation, 16 bits scaled to 8, alpha or key composited."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if img.mode == "I;16":
        arr = np.asarray(img).astype(np.uint32)
        grey = (arr * 255 // 65535).astype(np.uint8)
        out = np.repeat(grey[..., None], 3, axis=2).astype(np.float64)
        if "transparency" in img.info:
            out[arr == img.info["transparency"]] = BACKGROUND
        return out.round().astype(np.uint8)
    if img.mode in ("RGBA", "LA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba)
                          .convert("RGB"))
    return np.asarray(img.convert("RGB"))


CASES = [("PNG", m, t) for m in ("RGB", "L", "RGBA", "LA", "P", "I;16") for t in (False, True)] + \
    [("JPEG", "RGB", False), ("JPEG", "L", False), ("JPEG", "CMYK", False), ("TIFF", "RGB", False),
     ("TIFF", "RGBA", True), ("WEBP", "RGBA", True)]


@pytest.mark.parametrize("fmt,mode,transparent", CASES, ids=[f"{f}-{m}-{'t' if t else 'o'}" for f, m, t in CASES])
def test_every_mode_and_orientation_matches_exif_transpose(fmt, mode, transparent):
    upright = _upright(mode, transparent)
    for orientation in range(1, 9):
        data = _encode(upright, fmt, orientation)
        ref = _reference(data)
        assert ref.shape == (40, 64, 3), (orientation, ref.shape)  # the reference itself is upright
        enc = process_image(data, ImageOptions(resize_mode="no", encode_format="png", background=BACKGROUND))
        got = np.asarray(Image.open(io.BytesIO(enc.data)))
        assert got.shape == ref.shape and (enc.width, enc.height) == (64, 40), (orientation, got.shape)
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 1, (orientation, int(diff.max()), np.argwhere(diff > 1)[:3].tolist())
        # downscaled, the geometry stays upright and the content close to the reference resized alike
        enc = process_image(data, ImageOptions(image_size=20, resize_mode="keep_ratio_largest", encode_format="png",
                                               background=BACKGROUND))
        small = np.asarray(Image.open(io.BytesIO(enc.data))).astype(float)
        want = np.asarray(Image.fromarray(ref).resize((20, 12), Image.Resampling.BICUBIC)).astype(float)
        assert small.shape == want.shape == (12, 20, 3), orientation
        assert np.abs(small - want).mean() < 12, (orientation, np.abs(small - want).mean())


def _peak_rss_mb(code: str) -> dict:
    """Runs `code` in a fresh interpreter; it prints a json dict; ru_maxrss growth over the setup is added."""
    script = ("import json, resource, sys\n"
              "def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n" + code)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_decode_memory_is_bounded_by_bytes_not_only_pixels(tmp_path):
    # a 16-bit 6000x6000 PNG is ~100 KB on disk and 72 MB decoded; its 8-bit conversion once took 1 GB
    path = tmp_path / "deep.png"
    ramp = (np.arange(6000, dtype=np.uint32)[None, :] * 10 % 65536).astype(np.uint16)
    Image.fromarray(np.repeat(ramp, 6000, axis=0)).save(path)
    assert path.stat().st_size < 2_000_000
    r = _peak_rss_mb(
        "from data_prep.media.images import process_image\nfrom data_prep.options import ImageOptions\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        "process_image(b'', ImageOptions()) if False else None\n"
        "base = peak()\n"
        "enc = process_image(data, ImageOptions(image_size=256, encode_format='png'))\n"
        "print(json.dumps({'base': base, 'grown': peak() - base, 'size': [enc.width, enc.height]}))\n")
    print(f"16-bit 6000x6000 PNG: peak RSS grew {r['grown']:.0f} MB over {r['base']:.0f} MB")
    assert r["size"] == [256, 256]
    assert r["grown"] < 200, r  # the decoded 16-bit image (72 MB) and small copies; was ~1000 MB

    # --upscale of a 4000x1 image: a 1,024,000x256 canvas (1 GB) is refused before it is allocated
    r = _peak_rss_mb(
        "import io\nfrom PIL import Image\nfrom data_prep.media.images import Reject, process_image\n"
        "from data_prep.options import ImageOptions\n"
        "buf = io.BytesIO(); Image.new('RGB', (4000, 1), 'red').save(buf, 'PNG')\n"
        "base = peak()\n"
        "try:\n    process_image(buf.getvalue(), ImageOptions(image_size=256, upscale=True)); reason = None\n"
        "except Reject as e:\n    reason = e.reason\n"
        "print(json.dumps({'base': base, 'grown': peak() - base, 'reason': reason}))\n")
    print(f"--upscale 4000x1: peak RSS grew {r['grown']:.0f} MB, {r['reason']!r}")
    assert r["reason"] and r["reason"].startswith("resized image too large"), r
    assert r["grown"] < 50, r


def test_decoded_bytes_limit_rejects_before_decoding():
    buf = io.BytesIO()
    Image.new("RGBA", (3000, 3000)).save(buf, "PNG")  # 36 MB as RGBA in memory
    with pytest.raises(Reject, match="decoded image too large"):
        process_image(buf.getvalue(), ImageOptions(max_decode_bytes=16 * 2**20))
    assert process_image(buf.getvalue(), ImageOptions(max_decode_bytes=64 * 2**20, image_size=32)).width == 32
