"""Peak memory of decoding one image for a shard: `data_prep.media.images.process_image` against the plain Pillow
path (open, `ImageOps.exif_transpose`, composite or convert to RGB, resize) on images that are small on disk and
large in pixels. Each measurement runs in a fresh interpreter; the figure is the growth of its peak RSS
(ru_maxrss) over the moment before the decode, so imports and the file bytes do not count.

    python benchmarks/bench_decode_memory.py [--side 6000]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MAKE = {  # name -> code that saves the test image to `path` (side x side, EXIF orientation 6)
    "16-bit grey PNG": "Image.fromarray(np.tile((np.arange(side, dtype=np.uint32) * 10 % 65536).astype(np.uint16), "
                       "(side, 1)))",
    "RGBA PNG": "Image.fromarray(np.tile(np.arange(side, dtype=np.uint8)[:, None], (side, 4)).reshape(side, side, 4))",
    "palette PNG with transparency": "Image.fromarray(np.tile(np.arange(side, dtype=np.uint8) % 16, (side, 1)), 'L')"
                                     ".convert('P')",
}

PLAIT = ("from data_prep.media.images import process_image\nfrom data_prep.options import ImageOptions\n"
         "run = lambda data: process_image(data, ImageOptions(image_size=256, encode_format='jpg'))\n")
PILLOW = ("import io\nfrom PIL import Image, ImageOps\n"
          "def run(data):\n"
          "    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))\n"
          "    if img.mode == 'I;16':\n"
          "        img = Image.fromarray((np.asarray(img, dtype=np.float64) * (255 / 65535)).astype(np.uint8))\n"
          "    if img.mode in ('RGBA', 'LA') or 'transparency' in img.info:\n"
          "        rgba = img.convert('RGBA')\n"
          "        img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)\n"
          "    img = img.convert('RGB')\n"
          "    scale = 256 / min(img.size)\n"
          "    img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)\n"
          "    buf = io.BytesIO(); img.save(buf, 'JPEG', quality=95)\n")


def measure(path: Path, code: str) -> float:
    script = ("import json, resource\nimport numpy as np\n" + code +
              f"data = open({str(path)!r}, 'rb').read()\n"
              "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
              "base = peak(); run(data); print(json.dumps(peak() - base))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=6000, help="image width and height in pixels")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_decode_memory_") as d:
        print(f"{'image (' + str(a.side) + 'x' + str(a.side) + ')':<34} {'file':>8} {'plait MB':>9} "
              f"{'Pillow MB':>10} {'ratio':>6}")
        for name, make in MAKE.items():
            path = Path(d) / "img.png"
            subprocess.run([sys.executable, "-c", "import numpy as np\nfrom PIL import Image\n"
                            f"side = {a.side}\nimg = {make}\nexif = Image.Exif(); exif[0x0112] = 6\n"
                            "kw = {'transparency': 0} if img.mode == 'P' else {}\n"
                            f"img.save({str(path)!r}, exif=exif.tobytes(), **kw)"], check=True)
            plait, pillow = measure(path, PLAIT), measure(path, PILLOW)
            print(f"{name:<34} {path.stat().st_size / 1e3:>6.0f}kB {plait:>9.0f} {pillow:>10.0f} "
                  f"{pillow / max(plait, 1):>5.1f}x")


if __name__ == "__main__":
    main()
