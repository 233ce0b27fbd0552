"""`plait prep shard` over a slow, flaky web (issue 18), against its own local-file run and img2dataset 1.47.0.

    flock /tmp/plait-bench.lock .venv/bin/python benchmarks/bench_prep_web.py [--rows 1000] [--processes 2]
        [--latency-ms 100] [--jitter 0.5] [--fail-share 0.02] [--slow-share 0.003] [--hosts 4] [--dominant 0.85]

A local web server (asyncio, in its own process) serves the benchmark photos (bench_prep.photos: Debian's
opencv-doc examples and mate-backgrounds) on 127.0.0.1 .. 127.0.0.<hosts>, one host holding --dominant of the
URLs as Flickr's static hosts do for YFCC100M. Each reply waits a first-byte latency of --latency-ms ± --jitter;
--fail-share of the rows fail on their first request with 503 or 429 (`Retry-After: 1`), --slow-share trickle
their body over --slow-s seconds. Which rows fail or trickle is a function of the row, so every run sees the same
web. The server's loop stops by itself after --max-requests or --max-seconds, and reports politeness per run:
the most concurrent requests per host, and 429 retries that came before their Retry-After.

One run measures, interleaved over --repeat rounds (best of each): plait on file:// URLs (the ceiling), plait on
the server, img2dataset on the server (same processes, 16 threads, retries 2) and on file:// URLs (what the web
costs the peer: when neither tool waits on the network, the web ratio is bounded by the local-file one), then
checks that the web run wrote the same samples into the same shards as the local run and accounted for every row.
img2dataset runs in its own venv (benchmarks/.venv/img2dataset, created by bench_prep.ensure_img2dataset: it pins
webdataset<0.3, opencv<5).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import socket
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_prep import ensure_img2dataset, photos  # noqa: E402


# ------------------------------------------------------------------------------------------------ the web
class Web:
    """What the server does with a row, as a pure function of the row (and the attempt for latency)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.latency_s, self.jitter = a.latency_ms / 1000, a.jitter
        self.fail_share, self.slow_share, self.slow_s = a.fail_share, a.slow_share, a.slow_s
        self.hosts, self.dominant = a.hosts, a.dominant

    def _u(self, row: int, salt: str) -> float:
        return random.Random(f"{salt}:{row}").random()

    def host(self, row: int) -> int:
        """1-based host number: the dominant host 1 holds --dominant of the rows, the others share the rest."""
        if self.hosts == 1 or self._u(row, "host") < self.dominant:
            return 1
        return 2 + int(self._u(row, "other") * (self.hosts - 1))

    def fails_first(self, row: int) -> int | None:
        if self._u(row, "fail") >= self.fail_share:
            return None
        return 429 if row % 2 else 503

    def slow(self, row: int) -> bool:
        return self._u(row, "slow") < self.slow_share

    def latency(self, row: int, attempt: int) -> float:
        return self.latency_s * (1 + self.jitter * (2 * random.Random(f"lat:{row}:{attempt}").random() - 1))


def serve(web: Web, files: list[str], port: int, max_requests: int, max_seconds: float, ready) -> None:
    bodies = [Path(f).read_bytes() for f in files]
    attempts: Counter = Counter()
    stats = {"requests": 0, "status": Counter(), "active": Counter(), "max_active": Counter(), "early_retries": 0,
             "connections": 0}
    refused_at: dict[str, float] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = writer.get_extra_info("sockname")[0]
        stats["connections"] += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                path = head.split(b" ", 2)[1].decode()
                close = b"connection: close" in head.lower()
                if path == "/_stats":  # the benchmark's own report, then reset for the next run
                    body = json.dumps({k: (dict(v) if isinstance(v, Counter) else v) for k, v in stats.items()})
                    for k in ("status", "max_active"):
                        stats[k] = Counter()
                    stats["requests"] = stats["early_retries"] = stats["connections"] = 0
                    attempts.clear()
                    refused_at.clear()
                    await _reply(writer, 200, body.encode(), close=True)
                    return
                stats["requests"] += 1
                if stats["requests"] > max_requests:
                    loop.stop()
                    return
                parts = path.strip("/").split("/")  # r/<row>/<photo>.jpg
                row, photo = int(parts[1]), int(parts[2].split(".")[0])
                attempts[path] += 1
                n = attempts[path]
                if path in refused_at and time.monotonic() < refused_at[path]:
                    stats["early_retries"] += 1
                stats["active"][host] += 1
                stats["max_active"][host] = max(stats["max_active"][host], stats["active"][host])
                try:
                    await asyncio.sleep(web.latency(row, n))
                    status = web.fails_first(row) if n == 1 else None
                    if status is not None:
                        stats["status"][str(status)] += 1
                        if status == 429:
                            refused_at[path] = time.monotonic() + 1.0
                        await _reply(writer, status, b"busy", (("Retry-After", "1"),) if status == 429 else (),
                                     close)
                    else:
                        stats["status"]["200"] += 1
                        await _reply(writer, 200, bodies[photo], close=close,
                                     trickle_s=web.slow_s if web.slow(row) else 0.0)
                finally:
                    stats["active"][host] -= 1
                if close:
                    return
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        servers = [await asyncio.start_server(handle, f"127.0.0.{h}", port, backlog=1024)
                   for h in range(1, web.hosts + 1)]
        ready.send(True)
        await asyncio.sleep(max_seconds)
        for s in servers:
            s.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    except RuntimeError:  # loop.stop() after --max-requests
        pass


async def _reply(writer, status: int, body: bytes, headers=(), close: bool = False, trickle_s: float = 0.0) -> None:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nContent-Type: image/jpeg\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + ("Connection: close\r\n" if close else "") + "\r\n"
    writer.write(head.encode())
    if trickle_s:
        step = math.ceil(len(body) / 20)
        for i in range(0, len(body), step):
            writer.write(body[i:i + step])
            await writer.drain()
            await asyncio.sleep(trickle_s / 20)
    else:
        writer.write(body)
    await writer.drain()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=10) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------------------------------------ the runs
def write_corpus(path: Path, files: list[str], rows: int, web: Web | None, port: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for i in range(rows):
            k = i % len(files)
            url = f"file://{files[k]}" if web is None else f"http://127.0.0.{web.host(i)}:{port}/r/{i}/{k}.jpg"
            w.writerow([url, f"photo number {i}"])


def run_plait(corpus: Path, out: Path, a: argparse.Namespace, per_shard: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "data_prep", "shard", "--input", str(corpus), "--output", str(out),
           "--image-size", "256", "--resize-mode", "keep_ratio", "--encode-quality", "95", "--processes",
           str(a.processes), "--samples-per-shard", str(per_shard), "--no-dedup", "--no-progress",
           "--threads", str(a.threads), "--max-per-host", str(a.max_per_host), "--allow-private-addresses",
           "--local-root", "/usr/share"]  # the photos' folders (opencv-doc, mate-backgrounds)
    tree = a.plait_tree or str(REPO)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": tree})
    return time.perf_counter() - t, json.loads((out / "manifest.json").read_text())


def run_img2dataset(corpus: Path, out: Path, a: argparse.Namespace, per_shard: int) -> tuple[float, int]:
    cmd = [str(ensure_img2dataset()), "--url_list", str(corpus), "--input_format", "csv", "--url_col", "url",
           "--caption_col", "caption", "--output_folder", str(out), "--output_format", "webdataset",
           "--processes_count", str(a.processes), "--thread_count", str(a.threads), "--image_size", "256",
           "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True", "--encode_quality", "95",
           "--encode_format", "jpg", "--number_sample_per_shard", str(per_shard), "--distributor",
           "multiprocessing", "--enable_wandb", "False", "--retries", "2", "--timeout", "10"]
    t = time.perf_counter()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # no PyPI update check at import (offline node)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t
    ok = sum(json.loads(Path(p).read_text())["successes"] for p in glob.glob(str(out / "*_stats.json")))
    return wall, ok


def shard_contents(out: Path) -> dict[str, list[tuple[str, str]]]:
    """shard -> [(member name, sha256)] without the .json members (they hold the URL, which differs)."""
    found = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            found[tar_path.name] = [(m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest())
                                    for m in tar if m.isfile() and not m.name.endswith(".json")]
    return found


def http10_run(tmp: Path, files: list[str], a: argparse.Namespace, per_shard: int) -> dict:
    """The same photos behind Python's own `http.server` (HTTP/1.0: Content-Length, one response per connection,
    then close), the kind of plain server much of the web still runs: how many rows each tool keeps."""
    import functools
    import http.server
    import threading

    www = tmp / "www"
    www.mkdir()
    for k, f in enumerate(files):
        shutil.copy(f, www / f"{k}.jpg")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        corpus = tmp / "http10.csv"
        with open(corpus, "w", newline="") as out:
            w = csv.writer(out)
            w.writerow(["url", "caption"])
            w.writerows([f"http://127.0.0.1:{httpd.server_address[1]}/{i % len(files)}.jpg", f"photo number {i}"]
                        for i in range(a.rows))
        _, info = run_plait(corpus, tmp / "http10_plait", a, per_shard)
        kept = {"plait": info["num_ok"]}
        if not a.skip_img2dataset:
            kept["img2dataset"] = run_img2dataset(corpus, tmp / "http10_i2d", a, per_shard)[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
    print(f"HTTP/1.0 server (http.server), {a.rows} rows kept: " + ", ".join(f"{k} {v}" for k, v in kept.items()))
    return kept


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16, help="download threads per process (both tools)")
    ap.add_argument("--max-per-host", type=int, default=8, help="plait's per-host cap per process")
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--jitter", type=float, default=0.5, help="latency spread: 0.5 = ±50%%")
    ap.add_argument("--fail-share", type=float, default=0.02, help="rows whose first request gets 503 or 429")
    ap.add_argument("--slow-share", type=float, default=0.003, help="rows whose body trickles over --slow-s")
    ap.add_argument("--slow-s", type=float, default=3.0)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--dominant", type=float, default=0.85, help="share of the rows on host 1")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-img2dataset", action="store_true")
    ap.add_argument("--plait-tree", default=None, help="another checkout of plait to run (a before/after figure)")
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    a = ap.parse_args(argv)
    files = photos()
    web = Web(a)
    port = free_port()
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=serve, args=(web, files, port, a.max_requests, a.max_seconds,
                                                                 child), daemon=True)
    server.start()
    assert parent.poll(60), "the benchmark server did not start"
    per_shard = math.ceil(a.rows / (2 * a.processes))  # 2 shards per process, as bench_prep
    result: dict = {"config": {k: v for k, v in vars(a).items()}, "cores": os.cpu_count()}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_prep_web_") as d:
            tmp = Path(d)
            write_corpus(tmp / "local.csv", files, a.rows, None, port)
            write_corpus(tmp / "web.csv", files, a.rows, web, port)
            rows_per_host = Counter(web.host(i) for i in range(a.rows))
            print(f"corpus: {a.rows} rows over {len(files)} real photos; {a.processes} processes x {a.threads} "
                  f"threads; web: {a.latency_ms:g} ms ±{a.jitter:.0%} first byte, {a.fail_share:.1%} fail once "
                  f"(503 / 429 Retry-After 1), {a.slow_share:.1%} trickle over {a.slow_s:g}s; hosts "
                  f"{dict(sorted(rows_per_host.items()))}; {os.cpu_count()} cores", flush=True)
            best: dict[str, tuple[float, int]] = {}
            politeness: dict[str, dict] = {}
            outs = {}
            for rep in range(a.repeat):
                runs = {"local": lambda: run_plait(tmp / "local.csv", tmp / f"local{rep}", a, per_shard),
                        "web": lambda: run_plait(tmp / "web.csv", tmp / f"web{rep}", a, per_shard)}
                if not a.skip_img2dataset:
                    runs["img2dataset"] = lambda: run_img2dataset(tmp / "web.csv", tmp / f"i2d{rep}", a, per_shard)
                    # the peer on local files too: how much of its web time the web costs it
                    runs["img2dataset_local"] = lambda: run_img2dataset(tmp / "local.csv", tmp / f"i2dl{rep}", a,
                                                                        per_shard)
                for name, fn in runs.items():
                    server_stats(port)  # reset
                    wall, info = fn()
                    n = info if isinstance(info, int) else info["num_ok"]
                    if name not in ("local", "img2dataset_local"):
                        politeness[name] = server_stats(port)
                    if isinstance(info, dict):
                        outs[name] = (tmp / f"{name}{rep}", info)
                    if name not in best or wall < best[name][0]:
                        best[name] = (wall, n)
            rate = {name: n / wall for name, (wall, n) in best.items()}
            for name, label in (("local", "plait, file://      "), ("web", "plait, web server   "),
                                ("img2dataset", "img2dataset, web    "),
                                ("img2dataset_local", "img2dataset, file://")):
                if name in best:
                    print(f"{label}: {rate[name]:7.1f} samples/s ({best[name][1]} in {best[name][0]:.2f}s)")
            result["samples_per_s"] = {k: round(v, 2) for k, v in rate.items()}
            result["web_over_local"] = round(rate["web"] / rate["local"], 3)
            print(f"plait web / local   : {result['web_over_local']:7.2f}   (target >= 0.85)")
            if "img2dataset" in rate:
                result["plait_over_img2dataset"] = round(rate["web"] / rate["img2dataset"], 3)
                print(f"plait / img2dataset : {result['plait_over_img2dataset']:7.2f}   (target >= 2.5)")
                result["img2dataset_web_over_local"] = round(rate["img2dataset"] / rate["img2dataset_local"], 3)
                result["plait_over_img2dataset_local_files"] = round(rate["local"] / rate["img2dataset_local"], 3)
                print(f"img2dataset web / local: {result['img2dataset_web_over_local']:4.2f}; on local files plait is "
                      f"{result['plait_over_img2dataset_local_files']:.2f}x img2dataset (the ceiling of the web "
                      f"ratio when neither tool waits on the network)")
            local_dir, local_info = outs["local"]
            web_dir, web_info = outs["web"]
            same = shard_contents(local_dir) == shard_contents(web_dir)
            reasons = Counter(web_info.get("reasons") or {})
            result["identical_to_local"] = same
            result["web_rows"] = {"input": web_info["num_input_rows"], "ok": web_info["num_ok"],
                                  "rejected": web_info["num_rejected"], "reasons": dict(reasons)}
            result["politeness"] = politeness
            print(f"web run: {web_info['num_input_rows']} rows = {web_info['num_ok']} ok + "
                  f"{web_info['num_rejected']} rejected {dict(reasons)}; same samples in the same shards as the "
                  f"local run: {same}")
            for name, p in politeness.items():
                print(f"server saw ({name}): {p['requests']} requests {p['status']}, most concurrent per host "
                      f"{p['max_active']}, 429 retries before Retry-After: {p['early_retries']}, "
                      f"{p['connections']} connections")
            result["http10_kept"] = http10_run(tmp, files, a, per_shard)
    finally:
        server.kill()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
