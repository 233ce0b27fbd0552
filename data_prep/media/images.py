"""Image processing: decode, EXIF orientation, mode conversion, resize, encode, filters, caption cleanup.

Every rejection is a `Reject(reason)` raised from here and turned into data (a manifest row) by the caller; the
reasons are short fixed phrases followed by details, so that `merge` can count them (`top reject reasons`).

Speed: when a JPEG is downscaled, `Image.draft` lets libjpeg decode at 1/2, 1/4 or 1/8 size (never below the
target), which skips most of the IDCT work; an image that already fits, is an upright RGB JPEG and should be a
JPEG keeps its original bytes (no decode of pixels, no re-encode, no generation loss).
"""
from __future__ import annotations

import io
import math
import re
import struct
import unicodedata
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from data_prep.options import ImageOptions

_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX}
_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)
# what undoes each EXIF orientation (as `ImageOps.exif_transpose`)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
# Pillow orients these while loading and already reports the upright size: turning them again rotates twice
_LOADER_ORIENTS = ("TIFF",)
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# decoded bytes per pixel (Pillow stores RGB, CMYK, YCbCr padded to 4 bytes)
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 4, "PA": 4, "La": 4, "I;16": 2, "I;16B": 2, "I;16L": 2,
                    "I;16N": 2}
_MAX_SIDE = {"jpg": 65_500, "webp": 16_383, "png": 2**31 - 1}
_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")


class Reject(Exception):
    """A row that must not become a sample; `transient` marks failures `repair` may retry."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


@dataclass
class Encoded:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


def clean_caption(raw: str | bytes | None, opts: ImageOptions, required: bool = True) -> str:
    """Unicode NFC, control characters and runs of whitespace to one space; rejects empty/long/undecodable."""
    if not isinstance(raw, (str, bytes, type(None))):  # a number or list in a JSON or parquet caption column
        raise Reject(f"caption is not text ({type(raw).__name__})")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Reject("caption is not valid UTF-8") from None
    text = unicodedata.normalize("NFC", raw or "")
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    text = " ".join(text.split())
    if not text and required and not opts.allow_empty_caption:
        raise Reject("empty caption")
    if len(text) > opts.max_caption_length:
        raise Reject(f"caption too long ({len(text)} > {opts.max_caption_length} characters)")
    return text


def target_geometry(width: int, height: int, opts: ImageOptions) -> tuple[float, tuple[int, int] | None]:
    """(scale, final canvas) for an upright image: scale <= 1 unless upscaling is allowed; canvas is the crop or
    border size (None: the resized image itself)."""
    size, mode = opts.image_size, opts.resize_mode
    if mode == "no":
        return 1.0, None
    short, long = min(width, height), max(width, height)
    scale = size / (short if mode in ("keep_ratio", "center_crop") else long)
    if not opts.upscale:
        scale = min(scale, 1.0)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if mode == "center_crop":
        side = min(size, new_w, new_h)  # a square even when the image is smaller than the target
        return scale, (side, side)
    if mode == "border":
        return scale, (size, size)
    return scale, None


def process_image(data: bytes | None, opts: ImageOptions,
                  pixels: tuple[str, tuple[int, int], bytes] | None = None) -> Encoded:
    if pixels is not None:
        img = Image.frombytes(*pixels)
        fmt, orientation = None, 1
    else:
        img = _open(data)
        fmt = img.format
        orientation = 1 if fmt in _LOADER_ORIENTS else _orientation(img)
    stored_w, stored_h = img.size
    if stored_w * stored_h > opts.max_pixels:
        raise Reject(f"decompression bomb ({stored_w}x{stored_h} > {opts.max_pixels} pixels)")
    width, height = (stored_h, stored_w) if orientation in _SWAPS_AXES else (stored_w, stored_h)
    check_geometry(width, height, opts)
    scale, canvas = target_geometry(width, height, opts)
    check_output_size(width, height, scale, canvas, opts)

    if (opts.keep_original_jpeg and fmt == "JPEG" and img.mode == "RGB" and orientation == 1 and scale == 1.0
            and canvas in (None, (width, height)) and opts.encode_format == "jpg"
            and getattr(img, "n_frames", 1) == 1 and data.rstrip(b"\0\r\n").endswith(b"\xff\xd9")):
        # no pixel decode here: a JPEG that lost its end-of-image marker (truncated) takes the decode path below
        return Encoded(data, "jpg", width, height, width, height)

    if fmt == "JPEG" and scale < 1.0:
        request = (math.ceil(stored_w * scale), math.ceil(stored_h * scale))
        img.draft("RGB", request)
        if img.decoderconfig[:1] == (8,) and img.info.get("progressive"):
            img = _dc_only(data, request) or img
    decoded = img.size[0] * img.size[1] * _BYTES_PER_PIXEL.get(img.mode, 4)
    if decoded > opts.max_decode_bytes:
        raise Reject(f"decoded image too large ({img.size[0]}x{img.size[1]} {img.mode}: {decoded} > "
                     f"{opts.max_decode_bytes} bytes)")
    try:
        img.load()
        # reduced by an integer factor before any conversion: each conversion copies the image at its bytes per
        # pixel, so converting a large 16-bit or transparent image first would multiply the decode memory
        img = to_rgb(img, opts.background, _reduce_factor(img.size, scale))
    except Reject:
        raise
    except OSError as e:
        msg = str(e)
        raise Reject("truncated image" if "truncated" in msg else f"decode error: {msg[:200]}") from None
    except (ValueError, SyntaxError, IndexError, struct.error, Image.DecompressionBombError) as e:
        raise Reject(f"decode error: {type(e).__name__}: {str(e)[:200]}") from None
    if orientation != 1:
        # from the value read before decoding: a converted image no longer carries the EXIF block
        img = img.transpose(_TRANSPOSE[orientation])
    img = resize(img, scale, canvas, width, height, opts.background, opts.resample)
    return Encoded(encode(img, opts), opts.encode_format, img.width, img.height, width, height)


def _orientation(img: Image.Image) -> int:
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not lose the image
        return 1
    return orientation if orientation in range(1, 9) else 1


def check_geometry(width: int, height: int, opts: ImageOptions) -> None:
    if min(width, height) < max(1, opts.min_image_size):
        raise Reject(f"image too small ({width}x{height} < {opts.min_image_size})")
    ratio = max(width, height) / min(width, height)
    if ratio > opts.max_aspect_ratio:
        raise Reject(f"aspect ratio too large ({ratio:.1f} > {opts.max_aspect_ratio:g})")


def check_output_size(width: int, height: int, scale: float, canvas: tuple[int, int] | None,
                      opts: ImageOptions) -> None:
    """Refuses a resized image larger than --max-pixels or than the encoder takes, before allocating it: with
    --upscale a 4000x1 strip would otherwise become a 1,024,000x256 canvas (a gigabyte)."""
    w, h = canvas or (max(1, round(width * scale)), max(1, round(height * scale)))
    if w * h > opts.max_pixels or max(w, h) > _MAX_SIDE[opts.encode_format]:
        raise Reject(f"resized image too large ({width}x{height} -> {w}x{h}; at most {opts.max_pixels} pixels "
                     f"and {_MAX_SIDE[opts.encode_format]} per side for {opts.encode_format})")


def _reduce_factor(size: tuple[int, int], scale: float) -> int:
    """Integer shrink that keeps at least twice the target size (as Pillow's `reducing_gap=2`)."""
    return max(1, int(1 / (2 * scale))) if scale < 1.0 else 1


def resize(img: Image.Image, scale: float, canvas: tuple[int, int] | None, width: int, height: int,
           background: tuple[int, int, int], resample: str = "bicubic") -> Image.Image:
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if img.size != new_size:
        img = img.resize(new_size, _RESAMPLE[resample])
    if canvas is None or canvas == img.size:
        return img
    cw, ch = canvas
    if cw <= img.width and ch <= img.height:  # center crop
        left, top = (img.width - cw) // 2, (img.height - ch) // 2
        return img.crop((left, top, left + cw, top + ch))
    out = Image.new("RGB", canvas, background)  # border
    out.paste(img, ((cw - img.width) // 2, (ch - img.height) // 2))
    return out


def to_rgb(img: Image.Image, background: tuple[int, int, int], reduce: int = 1) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, shrunk by the integer `reduce` on the way; transparency (an alpha channel,
    a transparent palette entry, or a PNG tRNS colour key on an RGB/L/16-bit image) is composited on
    `background`. Every intermediate is at most 4 bytes per pixel of the decoded image."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    key = img.info.get("transparency")
    if img.mode in _DEEP_MODES:
        img = _deep_to_8bit(img, key)  # L, or LA where the tRNS key marked pixels transparent
        key = None
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or key is not None:
        img = img.convert("RGBA") if img.mode not in ("RGBA", "LA") else img  # Pillow applies the tRNS key
    elif img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if reduce > 1:
        img = img.reduce(reduce)  # alpha premultiplied by Pillow while averaging
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _deep_to_8bit(img: Image.Image, key: int | None) -> Image.Image:
    """16/32-bit grey or float to 8-bit L (LA with a transparency key), converted in bands of rows: a whole
    6000x6000 16-bit image as float64 arrays took a gigabyte."""
    import numpy as np
    lo, hi = img.getextrema()
    peak = 65535 if img.mode.startswith("I;16") or hi > 255 else 255
    width, height = img.size
    grey = Image.new("L", img.size)
    alpha = Image.new("L", img.size, 255) if isinstance(key, int) else None
    band = max(1, (1 << 22) // max(1, width))  # about 4 M pixels per band
    for top in range(0, height, band):
        box = (0, top, width, min(height, top + band))
        arr = np.asarray(img.crop(box))
        if img.mode == "F":
            out = np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8)
        else:
            out = (np.clip(arr.astype(np.int64), 0, peak) * 255 // peak).astype(np.uint8)
        grey.paste(Image.fromarray(out, "L"), box[:2])
        if alpha is not None:
            alpha.paste(Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8), "L"), box[:2])
    if alpha is None:
        return grey
    grey.putalpha(alpha)
    return grey


def encode(img: Image.Image, opts: ImageOptions) -> bytes:
    buf = io.BytesIO()
    fmt = _PIL_FORMAT[opts.encode_format]
    kwargs = {"quality": opts.encode_quality} if fmt in ("JPEG", "WEBP") else {"compress_level": 6}
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # ends an entropy-coded segment (not stuffing, not RSTn)


def dc_scans_only(data: bytes) -> bytes | None:
    """A progressive JPEG without the AC scans that a 1/8-scale decode ignores (None if `data` is not a
    progressive JPEG this parser follows).

    At 1/8 scale libjpeg decodes each block of a full-resolution component (luma; all components in 4:4:4) with a
    1x1 inverse DCT that reads only the DC coefficient, yet a progressive file is entropy-decoded whole, and the
    luma AC scans are most of its bytes. Dropping those scans (but the first one, see below) leaves a valid
    progressive JPEG with the same coefficients wherever the 1/8 decode reads any (subsampled chroma keeps its AC
    scans: libjpeg scales it with a larger IDCT), so the same pixels at a fraction of the cost (tested against the
    full decode). Multi-megapixel progressive photos otherwise dominate a corpus' decode time."""
    if data[:2] != b"\xff\xd8":
        return None
    out, pos, n = [b"\xff\xd8"], 2, len(data)
    full_res: set[int] | None = None  # ids of components at the maximal sampling factors
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos + 1]
        if marker == 0xD9:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > n:
            return None
        if marker == 0xC2:  # progressive Huffman SOF: component ids and sampling factors
            comps = [(data[pos + 10 + 3 * i], data[pos + 11 + 3 * i]) for i in range(data[pos + 9])]
            top = max(hv for _, hv in comps)
            full_res = {cid for cid, hv in comps if hv == top}
        if marker != 0xDA:
            out.append(data[pos:end])
            pos = end
            continue
        num_components = data[pos + 4]
        spectral_start = data[pos + 5 + 2 * num_components]
        m = _NEXT_MARKER.search(data, end)
        scan_end = m.start() if m else n
        if full_res is None:
            return None
        approx_high = data[pos + 7 + 2 * num_components] >> 4
        # kept: every scan of other components, DC scans, and each component's first AC scan from coefficient 1:
        # without any AC data libjpeg-turbo's block smoothing would also alter the DC values
        if not (spectral_start > 1 or (spectral_start == 1 and approx_high > 0)) or num_components != 1 \
                or data[pos + 5] not in full_res:
            out.append(data[pos:scan_end])
        pos = scan_end
    if full_res is None:
        return None
    out.append(b"\xff\xd9")
    return b"".join(out)


def _dc_only(data: bytes, request: tuple[int, int]) -> Image.Image | None:
    dc = dc_scans_only(data)
    if dc is None:
        return None
    img = Image.open(io.BytesIO(dc))
    img.draft("RGB", request)
    return img if img.decoderconfig[:1] == (8,) else None


def _open(data: bytes | None) -> Image.Image:
    if not data:
        raise Reject("empty file")
    head = data[:256].lstrip().lower()
    if head.startswith(_HTML_MARKERS):
        raise Reject("not an image: HTML or XML document")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise Reject(f"decompression bomb ({str(e)[:120]})") from None
        except UnidentifiedImageError:
            raise Reject("not an image: unrecognised format") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise Reject(f"decode error: {str(e)[:200]}") from None
