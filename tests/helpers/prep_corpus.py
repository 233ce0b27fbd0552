"""Test corpus for data_prep: real photos from Debian packages, tricky images built with Pillow, and a local HTTP
server on 127.0.0.1 that misbehaves in every way issue 3 lists. Built at test time in tmp folders."""
from __future__ import annotations

import glob
import io
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

OPENCV_EXAMPLES = "/usr/share/doc/opencv-doc/examples"
MATE = "/usr/share/backgrounds/mate"


def real_photos(limit: int | None = None, min_bytes: int = 0) -> list[str]:
    paths = sorted(glob.glob(f"{OPENCV_EXAMPLES}/**/*.jpg", recursive=True))
    paths = [p for p in paths if __import__("os").path.getsize(p) >= min_bytes]
    return paths[:limit] if limit else paths


def asymmetric_rgb(width: int = 64, height: int = 40) -> Image.Image:
    """Red top-left quadrant on blue: any flip or rotation moves the red corner."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 2] = 255
    arr[: height // 2, : width // 3] = (255, 0, 0)
    return Image.fromarray(arr)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    """JPEG whose stored pixels are `img` transformed so that applying EXIF `orientation` restores `img`."""
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
    stored = img.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(stored, exif=exif.tobytes())


def tricky_images() -> dict[str, bytes]:
    """name -> bytes of images that must all become RGB samples."""
    base = asymmetric_rgb()
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    frames = [asymmetric_rgb(), asymmetric_rgb().transpose(Image.Transpose.ROTATE_180)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    i16 = Image.fromarray((np.arange(64 * 40, dtype=np.uint16).reshape(40, 64) * 25))
    return {"cmyk.jpg": jpeg_bytes(base.convert("CMYK")), "grey.png": png_bytes(base.convert("L")),
            "rgba.png": png_bytes(rgba), "la.png": png_bytes(base.convert("LA")),
            "palette_transparent.png": png_bytes(pal), "animated.gif": gif.getvalue(), "16bit.png": png_bytes(i16)}


def broken_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected reason kind)."""
    good = jpeg_bytes(asymmetric_rgb(256, 256))
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, "PNG")
    wide = png_bytes(Image.new("RGB", (2000, 10), "white"))
    return {"zero.jpg": (b"", "empty file"), "corrupt.jpg": (bytes(range(256)) * 20, "not an image"),
            "truncated.jpg": (good[: len(good) // 3], "truncated image"),
            "page.jpg": (b"<!DOCTYPE html><html><body>Not found</body></html>", "not an image"),
            "bomb.png": (bomb.getvalue(), "decompression bomb"), "wide.png": (wide, "aspect ratio too large")}


class CorpusServer:
    """ThreadingHTTPServer on 127.0.0.1 serving `files` plus misbehaving routes:
    /status/N, /retry-after (429 with Retry-After: 1 the first time, then a JPEG), /always-429, /drip (one byte
    every 0.3 s), /loop-a <-> /loop-b redirects, /noai (X-Robots-Tag: noai), /flaky (500 until `heal()`)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.hits, self.healed = dict(files), {}, False
        self.peers, self.user_agents, self.lock, self.active, self.max_active = set(), set(), threading.Lock(), 0, 0
        self.ok = jpeg_bytes(asymmetric_rgb(300, 200))
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def leave(self):
                # Counted as done before the reply goes out: once the client has the body it may start its
                # next request, maybe before this thread would run a `finally` (a false overlap under load).
                if self.counted:
                    with server.lock:
                        server.active -= 1
                    self.counted = False

            def send(self, code, body=b"", headers=()):
                self.leave()
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                server.peers.add(self.client_address)
                server.user_agents.add(self.headers.get("User-Agent"))
                with server.lock:
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                self.counted = True
                try:
                    return self.route(path, server.hits[path])
                finally:
                    self.leave()

            def route(self, path, n):
                if path == "/sleepy.jpg":
                    time.sleep(0.2)
                    return self.send(200, server.ok)
                if path.startswith("/files/") and path[7:] in server.files:
                    return self.send(200, server.files[path[7:]], [("Content-Type", "image/jpeg")])
                if path.startswith("/status/"):
                    return self.send(int(path[8:]), b"error page")
                if path == "/retry-after":
                    return self.send(429, b"slow down", [("Retry-After", "1")]) if n == 1 else self.send(200, server.ok)
                if path == "/always-429":
                    return self.send(429, b"slow down", [("Retry-After", "1")])
                if path == "/flaky":
                    return self.send(200, server.ok) if server.healed else self.send(503, b"busy")
                if path == "/noai":
                    return self.send(200, server.ok, [("X-Robots-Tag", "noai")])
                if path in ("/loop-a", "/loop-b"):
                    return self.send(302, b"", [("Location", "/loop-b" if path == "/loop-a" else "/loop-a")])
                if path == "/redirect-ok":
                    return self.send(301, b"", [("Location", "/files/ok.jpg")])
                if path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    try:
                        for _ in range(1000):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.3)
                    except OSError:
                        pass
                    return None
                return self.send(404, b"not found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def heal(self) -> None:
        self.healed = True

    def __enter__(self) -> "CorpusServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def shard_members(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in the shards of `out`: key -> {member extension: bytes}."""
    found: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(Path(out).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                found.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return found
