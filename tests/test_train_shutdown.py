"""`plait train` always ends: an exception in the loop stops the loader's workers and exits non-zero within
seconds; a second SIGTERM/SIGINT exits at once even while the loop waits on a stalled loader. Real processes."""
from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.synthetic_shards import make_shards

ROOT = Path(__file__).resolve().parents[1]


def _spawn(run_dir: Path, spec: str, *overrides: str) -> subprocess.Popen:
    args = ["--config", "tiny", "--set", f"data.train_shards={spec}",
            "--set", f"train.run_dir={run_dir}", "--set", "data.batch_size=8", "--set", "data.num_workers=2",
            "--set", "train.log_every=1", *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.train.loop", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_all(proc: subprocess.Popen, pids: list[int]) -> None:
    """Cleanup for a failing test: this test's own processes, by pid."""
    for pid in [proc.pid, *pids]:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_an_error_in_the_loop_stops_the_workers_and_exits_within_seconds(tmp_path):
    """Worker slot 1 reads only undecodable images and raises mid-run while slot 0 is busy prefetching; the
    exception reaches the loop. Before the fix the process printed the traceback, then waited forever at exit
    for the other worker, which ignores the SIGTERM multiprocessing sends it."""
    spec = make_shards(tmp_path / "shards", [32, 32], broken={f"s001{i:04d}": "jpeg" for i in range(32)})
    proc = _spawn(tmp_path / "run", spec, "train.steps=1000", "data.max_bad_fraction=1.0", "data.shuffle_buffer=0")
    workers: list[int] = []
    try:
        lines, raised_at = [], None
        for line in proc.stdout:
            lines.append(line)
            if not workers and _alive(proc.pid):
                workers = _children(proc.pid)
            if line.startswith("Traceback"):
                raised_at = time.monotonic()
                break
        assert raised_at is not None, "".join(lines)
        proc.wait(timeout=30)
        out = "".join(lines) + proc.stdout.read()
        assert proc.returncode == 1, out
        assert "every one of the 32 samples read by worker slot 1" in out
        assert time.monotonic() - raised_at < 30
        assert not [pid for pid in workers if _alive(pid)], "loader workers outlived the run"
    finally:
        _kill_all(proc, workers)


class _StallingShards(http.server.BaseHTTPRequestHandler):
    """sizes.json, then a shard whose bytes never come: the loader blocks, as on a hung network mount."""

    requested = threading.Event()
    release = threading.Event()

    SIZES = json.dumps({"00000.tar": 64, "00001.tar": 64}).encode()

    def _head(self) -> bool:
        if not self.path.endswith(("sizes.json", ".tar")):
            self.send_error(404)
            return False
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.SIZES) if self.path.endswith(".json") else 1 << 20))
        self.end_headers()
        return True

    def do_HEAD(self):
        self._head()

    def do_GET(self):
        if not self._head():
            return
        if self.path.endswith(".json"):
            self.wfile.write(self.SIZES)
            return
        self.wfile.flush()
        type(self).requested.set()
        type(self).release.wait(120)

    def log_message(self, *args):
        pass


@pytest.fixture
def stalling_server():
    _StallingShards.requested.clear()
    _StallingShards.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallingShards)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _StallingShards.release.set()
    server.shutdown()


@pytest.mark.slow
def test_a_second_stop_signal_exits_at_once_while_the_loader_is_stuck(tmp_path, stalling_server):
    """The first SIGTERM asks for a checkpoint at the next step boundary, which a stuck loader never reaches;
    the second signal (here Ctrl-C's SIGINT) ends the process and its workers at once. Before the fix both
    signals were swallowed and the run hung forever."""
    proc = _spawn(tmp_path / "run", f"{stalling_server}/{{00000..00001}}.tar", "train.steps=1000")
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not _StallingShards.requested.wait(0.2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)[0]
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert proc.poll() is None  # the first signal waits for a step boundary
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 128 + signal.SIGINT, out
        assert "second SIGINT: exiting now" in out
        time.sleep(0.5)  # the kernel's parent-death signal and the explicit kill are immediate; reaping is not
        assert not [pid for pid in workers if _alive(pid)], "loader workers outlived the run"
    finally:
        _kill_all(proc, workers)
