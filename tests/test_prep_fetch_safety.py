"""Issue 15, fetch side: schemes and chained fsspec URLs (SSRF), bodies cut short, malformed URLs and redirects,
one deadline for the whole exchange, and workers that die with a killed job. Servers run on 127.0.0.1 only, so
every test that should reach them whitelists loopback with --allow-private-addresses, as a user would for a
local test server; the scheme rules must hold even then."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from data_prep.cli import main
from data_prep.fetch.fetcher import Fetcher
from data_prep.options import FetchOptions
from data_prep.media.images import Reject
from tests.helpers.prep_corpus import asymmetric_rgb, jpeg_bytes, real_photos
from tests.helpers.rude_server import RudeServer, reply

REPO = Path(__file__).resolve().parents[1]
JPEG = jpeg_bytes(asymmetric_rgb(320, 240))


def _records(out: Path) -> dict[int, dict]:
    return {r["row"]: r for r in pq.read_table(out / "samples.parquet").to_pylist()}


def _jsonl(path: Path, urls: list[str]) -> Path:
    # ensure_ascii keeps lone surrogates as \\udcxx escapes: the reader gets them back as Python strings
    path.write_text("".join(json.dumps({"url": u, "caption": f"row {i}"}) + "\n" for i, u in enumerate(urls)))
    return path


def _shard(table: Path, out: Path, *extra: str) -> dict[int, dict]:
    main(["shard", "--input", str(table), "--output", str(out), "--processes", "1", "--no-progress",
          "--allow-private-addresses", "--timeout", "2", "--retries", "0", "--image-size", "64", *extra])
    return _records(out)


def test_only_http_and_enabled_stores_chained_urls_refused(tmp_path):
    ok = lambda conn, n: reply(conn, 200, JPEG)  # noqa: E731
    with RudeServer({"/a.jpg": ok}) as srv:
        base = f"127.0.0.1:{srv.port}/a.jpg"
        urls = [f"simplecache::http://{base}", f"blockcache::http://{base}", f"filecache::http://{base}",
                f"webhdfs://{base}", f"ftp://{base}", "memory://a.jpg", f"s3://bucket/x.jpg::http://{base}",
                f"http://{base}"]
        recs = _shard(_jsonl(tmp_path / "in.jsonl", urls), tmp_path / "out")
        assert srv.hits == {"/a.jpg": 1}  # only the plain http row reached the server
    reasons = [recs[i]["reason"] for i in range(len(urls))]
    assert reasons[:3] == ["chained fsspec url refused"] * 3
    assert all(r.startswith("url scheme") and "not allowed" in r for r in reasons[3:6]), reasons
    assert reasons[6] == "chained fsspec url refused" and reasons[7] is None


def test_allow_schemes_flag_is_validated():
    with pytest.raises(ValueError, match="--allow-schemes ftp"):
        FetchOptions(allow_schemes=("s3", "ftp"))


def test_enabled_object_store_endpoint_obeys_the_private_address_rule(tmp_path):
    moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]' (the test extras)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        script = ("import json, sys, fsspec; from data_prep.fetch.fetcher import Fetcher; "
                  "from data_prep.options import FetchOptions; from data_prep.media.images import Reject\n"
                  "fs = fsspec.filesystem('s3'); fs.mkdir('plait-endpoint-check'); fs.pipe('plait-endpoint-check/x.jpg', b'bytes')\n"
                  "out = []\n"
                  "for private in (False, True):\n"
                  "    f = Fetcher(FetchOptions(allow_schemes=('s3',), allow_private=private))\n"
                  "    try: out.append(f.fetch('s3://plait-endpoint-check/x.jpg').decode())\n"
                  "    except Reject as r: out.append(r.reason)\n"
                  "fs.rm('plait-endpoint-check', recursive=True)  # moto's state is per process: leave none\n"
                  "print(json.dumps(out))")
        res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        refused, allowed = json.loads(res.stdout.strip().splitlines()[-1])
        assert refused.startswith("refused loopback address (127.0.0.1, the s3:// endpoint"), refused
        assert allowed == "bytes"
    finally:
        server.stop()


def test_body_cut_short_is_transient_and_repair_retries_it(tmp_path):
    def cut(conn, n):
        if n == 1:  # the first attempt: headers promise the whole JPEG, a third arrives, the connection drops
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(JPEG)}\r\n\r\n".encode() + JPEG[: len(JPEG) // 3])
            conn.close()
        else:
            reply(conn, 200, JPEG)

    with RudeServer({"/cut.jpg": cut}) as srv:
        out = tmp_path / "out"
        rec = _shard(_jsonl(tmp_path / "in.jsonl", [srv.url("/cut.jpg")]), out)[0]
        assert rec["reason"].startswith("connection closed early") and rec["transient"], rec
        main(["repair", str(out), "--processes", "1", "--no-progress"])
        assert srv.hits["/cut.jpg"] == 2
    assert _records(out)[0]["status"] == "ok"


def test_malformed_urls_and_redirects_are_row_rejects(tmp_path):
    def to(location):
        return lambda conn, n: reply(conn, 302, b"", (("Location", location),))

    routes = {"/ipv6": to("http://[::1/x"), "/port": to("http://127.0.0.1:99999/x"),
              "/idna": to("http://" + "a" * 70 + ".example/x"), "/ok.jpg": lambda c, n: reply(c, 200, JPEG)}
    with RudeServer(routes) as srv:
        urls = ["http://[::1/x.jpg", "http://127.0.0.1:99999/x.jpg", "http://a..b/x.jpg",
                "http://" + "b" * 70 + ".example/x.jpg", "http://exa\udcffmple.org/x.jpg",
                "http://user:hunter2@[bad/x.jpg", srv.url("/ipv6"), srv.url("/port"), srv.url("/idna"),
                srv.url("/ok.jpg")]
        recs = _shard(_jsonl(tmp_path / "in.jsonl", urls), tmp_path / "out")
    assert len(recs) == len(urls)
    for i in range(len(urls) - 1):
        assert recs[i]["status"] == "rejected" and recs[i]["reason"].startswith("bad url ("), (i, recs[i])
        assert not recs[i]["transient"]
    assert recs[len(urls) - 1]["status"] == "ok"
    assert "hunter2" not in (tmp_path / "out" / "samples.parquet").read_bytes().decode("latin-1")


def test_timeout_bounds_headers_and_error_bodies():
    header_lines = []

    def drip_headers(conn, n):  # a valid reply, one header line every 0.4 s: 4 s in all
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for i in range(10):
            time.sleep(0.4)
            conn.sendall(f"X-Drip-{i}: {i}\r\n".encode())  # fails once the client has hung up
            header_lines.append(i)
        conn.sendall(f"Content-Length: {len(JPEG)}\r\n\r\n".encode() + JPEG)

    def drip_error(conn, n):  # a 404 whose 60-byte page arrives one byte every 0.05 s
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 60\r\n\r\n")
        for _ in range(60):
            time.sleep(0.05)
            conn.sendall(b"x")

    with RudeServer({"/headers": drip_headers, "/error": drip_error}) as srv:
        fetcher = Fetcher(FetchOptions(allow_private=True, timeout_s=1.0, retries=0, threads=1))
        for path in ("/headers", "/error"):
            with pytest.raises(Reject) as err:
                fetcher.fetch(srv.url(path))
            assert err.value.reason == "timeout" and err.value.transient, (path, err.value.reason)
        time.sleep(0.5)
    assert len(header_lines) < 10  # the client hung up in the middle of the headers, not after them


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    def slow(conn, n):
        time.sleep(2)
        reply(conn, 200, JPEG)

    photos = real_photos(limit=1)
    assert photos, "apt-get install opencv-doc"
    with RudeServer({f"/{i}.jpg": slow for i in range(64)}, max_requests=64, max_seconds=60) as srv:
        table = _jsonl(tmp_path / "in.jsonl", [srv.url(f"/{i}.jpg") for i in range(64)])
        proc = subprocess.Popen([sys.executable, "-m", "data_prep", "shard", "--input", str(table), "--output",
                                 str(tmp_path / "out"), "--processes", "2", "--samples-per-shard", "8",
                                 "--threads", "2", "--allow-private-addresses", "--no-progress"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children: list[psutil.Process] = []
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not srv.hits:  # the workers are fetching
                time.sleep(0.1)
            assert srv.hits, "the job never reached the server"
            children = _descendants(proc.pid)
            assert len(children) >= 3  # forkserver, 2 workers (and the resource tracker)
            os.kill(proc.pid, signal.SIGKILL)
            _, alive = psutil.wait_procs(children, timeout=5)
            assert not alive, [(p.pid, p.cmdline()[-3:]) for p in alive]
        finally:  # leave nothing behind, even when the test fails
            proc.kill()
            proc.wait()
            for p in children:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
