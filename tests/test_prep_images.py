"""Image processing on real photos: resize modes, no upscaling, original JPEG bytes kept, draft decoding,
mode conversions, filters and caption cleanup."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from data_prep.options import ImageOptions
from data_prep.media.images import Reject, clean_caption, process_image, target_geometry
from tests.helpers.prep_corpus import MATE, jpeg_bytes, real_photos, tricky_images

BIG = f"{MATE}/nature/Dune.jpg"


@pytest.mark.parametrize("mode,size,expected", [
    ("keep_ratio", 256, (455, 256)), ("keep_ratio_largest", 256, (256, 144)), ("center_crop", 256, (256, 256)),
    ("border", 256, (256, 256)), ("no", 256, (1600, 900)), ("keep_ratio", 2000, (1600, 900)),
    ("center_crop", 2000, (900, 900)), ("border", 2000, (2000, 2000)),
])
def test_resize_modes_never_upscale(mode, size, expected):
    img = Image.new("RGB", (1600, 900), "green")
    enc = process_image(jpeg_bytes(img), ImageOptions(image_size=size, resize_mode=mode))
    out = Image.open(io.BytesIO(enc.data))
    assert out.size == expected == (enc.width, enc.height)
    assert (enc.original_width, enc.original_height) == (1600, 900)


def test_upscale_only_when_asked():
    data = jpeg_bytes(Image.new("RGB", (100, 50), "red"))
    assert process_image(data, ImageOptions(image_size=200)).width == 100
    assert process_image(data, ImageOptions(image_size=200, upscale=True)).height == 200
    assert target_geometry(100, 50, ImageOptions(image_size=200)) == (1.0, None)


def test_fitting_jpeg_keeps_original_bytes_and_big_one_is_downscaled():
    small = next(p for p in real_photos() if max(Image.open(p).size) <= 256 and Image.open(p).mode == "RGB"
                 and Image.open(p).getexif().get(0x0112, 1) == 1)
    data = open(small, "rb").read()
    assert process_image(data, ImageOptions(image_size=256)).data == data
    assert process_image(data, ImageOptions(image_size=256, keep_original_jpeg=False)).data != data
    big = open(BIG, "rb").read()
    w, h = Image.open(BIG).size
    enc = process_image(big, ImageOptions(image_size=256))
    assert min(enc.width, enc.height) == 256 and abs(enc.width / enc.height - w / h) < 0.01
    assert Image.open(io.BytesIO(enc.data)).format == "JPEG"
    png = process_image(big, ImageOptions(image_size=64, encode_format="webp"))
    assert Image.open(io.BytesIO(png.data)).format == "WEBP"


def test_every_mode_becomes_rgb_with_background():
    for name, data in tricky_images().items():
        enc = process_image(data, ImageOptions(encode_format="png", background=(0, 255, 0)))
        img = Image.open(io.BytesIO(enc.data))
        assert img.mode == "RGB" and img.size == (64, 40), name
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    enc = process_image(buf.getvalue(), ImageOptions(encode_format="png", background=(0, 0, 255)))
    assert Image.open(io.BytesIO(enc.data)).getpixel((5, 5)) == (0, 0, 255)


def test_filters_and_caption_cleanup():
    opts = ImageOptions(min_image_size=60, max_aspect_ratio=3)
    with pytest.raises(Reject, match="image too small"):
        process_image(jpeg_bytes(Image.new("RGB", (50, 80))), opts)
    with pytest.raises(Reject, match="aspect ratio too large"):
        process_image(jpeg_bytes(Image.new("RGB", (400, 100))), opts)
    assert clean_caption("  Cafe\u0301\tau\x00 lait\n ", ImageOptions()) == "Caf\u00e9 au lait"
    with pytest.raises(Reject, match="empty caption"):
        clean_caption(" \n", ImageOptions())
    assert clean_caption("", ImageOptions(), required=False) == ""
    with pytest.raises(Reject, match="caption too long"):
        clean_caption("x" * 20, ImageOptions(max_caption_length=10))
    with pytest.raises(Reject, match="not valid UTF-8"):
        clean_caption(b"caf\xe9", ImageOptions())


def test_progressive_jpeg_fast_path_gives_the_same_pixels():
    import numpy as np
    from data_prep.media.images import dc_scans_only
    path = f"{MATE}/abstract/Elephants_3840x2160.jpg"  # a real progressive photo
    data = open(path, "rb").read()
    assert Image.open(path).info.get("progressive")
    dc = dc_scans_only(data)
    assert dc is not None and len(dc) < len(data) / 2
    full, fast = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(dc))
    for img in (full, fast):
        img.draft("RGB", (480, 270))
    assert np.array_equal(np.asarray(full.convert("RGB")), np.asarray(fast.convert("RGB")))
    assert dc_scans_only(jpeg_bytes(Image.new("RGB", (64, 64)))) is None  # baseline JPEGs take the normal path
    enc = process_image(data, ImageOptions(image_size=256))
    assert (enc.width, enc.height) == (455, 256)
