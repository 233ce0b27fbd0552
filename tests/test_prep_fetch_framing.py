"""Response framings of real web servers, each from its own local server: HTTP/1.0 that closes after every
response, no Content-Length (the close ends the body), chunked encoding, `Connection: close` on a connection the
server keeps open, and a server that closes before the announced length. Bodies are larger than one socket read,
so a client that closes its socket before reading the body (as plait did on every HTTP/1.0 answer) fails here."""
from __future__ import annotations

import csv
import http.server
import os
import threading

import pyarrow.parquet as pq
import pytest

from data_prep.cli import main
from data_prep.fetch.fetcher import Fetcher
from data_prep.media.images import Reject
from data_prep.options import FetchOptions
from tests.helpers.prep_corpus import asymmetric_rgb, jpeg_bytes

BODY_BYTES = 300_000  # > the 8 KiB a first read pulls in with the headers: the body needs the socket open


def _handler(framing: str, bodies: dict[str, bytes]):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0" if framing in ("http10", "no_length", "early_close") else "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = bodies.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if framing == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(body), 65_536):
                    part = body[start:start + 65_536]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")
                return
            if framing == "early_close":
                self.send_header("Content-Length", str(len(body) + 1000))
            elif framing != "no_length":
                self.send_header("Content-Length", str(len(body)))
            if framing == "close_header":
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            if framing == "close_header":
                self.close_connection = False  # says close, keeps the connection open: the client must close

    return Handler


class FramingServer:
    def __init__(self, framing: str, bodies: dict[str, bytes]) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(framing, bodies))
        self.httpd.daemon_threads = True

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> "FramingServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("framing", ["http10", "no_length", "chunked", "close_header", "keep_alive"])
def test_every_framing_delivers_every_body(framing):
    bodies = {f"/{i}.bin": os.urandom(BODY_BYTES) for i in range(12)}
    with FramingServer(framing, bodies) as srv:
        fetcher = Fetcher(FetchOptions(allow_private=True, threads=4, timeout_s=20))
        got = list(fetcher.fetch_many([srv.url(p) for p in bodies]))
    assert [g if isinstance(g, bytes) else g.reason for g in got] == list(bodies.values())


def test_a_body_cut_short_is_a_transient_reject_not_a_sample():
    with FramingServer("early_close", {"/a.bin": os.urandom(BODY_BYTES)}) as srv:
        got = list(Fetcher(FetchOptions(allow_private=True, threads=1, timeout_s=20)).fetch_many([srv.url("/a.bin")]))
    assert isinstance(got[0], Reject) and got[0].transient, got[0]
    assert f"of {BODY_BYTES + 1000} bytes" in got[0].reason


def test_an_http10_server_loses_no_row_of_a_prep_run(tmp_path):
    # 60 distinct photos behind an HTTP/1.0 server (Content-Length, one response per connection)
    bodies = {f"/{i}.jpg": jpeg_bytes(asymmetric_rgb(400 + i, 300)) for i in range(60)}
    with FramingServer("http10", bodies) as srv:
        table = tmp_path / "in.csv"
        with open(table, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            w.writerows([srv.url(p), f"photo {p}"] for p in bodies)
        main(["shard", "--input", str(table), "--output", str(tmp_path / "out"), "--processes", "1",
              "--no-progress", "--allow-private-addresses", "--image-size", "64"])
    recs = pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist()
    assert [r["status"] for r in recs] == ["ok"] * 60, {r["reason"] for r in recs}
