"""The address rule for http(s) shard readers (data_prep/shards/remote.py): a host you typed may be private; a
redirect may not lead to a private address, by name or by address literal, unless PLAIT_TRUSTED_HOSTS names it.

Fixture: a folder of two synthetic shards behind a plain file server on 127.0.0.1, and a second server on
127.0.0.1 that answers every request with a 302 to the file server under another spelling of the same loopback
host (`localhost`, a name that was not typed, or `127.0.0.1` when `localhost` was typed), and a third that
serves the index files itself and redirects only the tars."""
from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from data_prep.maintenance.verify import verify
from data_prep.shards import remote
from tests.helpers.synthetic_shards import make_shards

ROOT = Path(__file__).resolve().parents[1]


def _serve(handler) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def servers(tmp_path, monkeypatch):
    """Ports: (files, every request redirected to localhost, every request redirected to 127.0.0.1, tars
    redirected to localhost); no host trusted beforehand."""
    monkeypatch.delenv(remote.ENV, raising=False)
    make_shards(tmp_path, [6, 6])
    class Files(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass
    file_server = _serve(functools.partial(Files, directory=str(tmp_path)))
    port = file_server.server_port

    def redirector(target_host: str):
        class Redirect(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(302)
                self.send_header("Location", f"http://{target_host}:{port}{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            do_HEAD = do_GET

            def log_message(self, *a):
                pass
        return _serve(Redirect)

    class TarsElsewhere(Files):
        def do_GET(self):
            if not self.path.endswith(".tar"):
                return super().do_GET()
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):
            return self.do_GET() if self.path.endswith(".tar") else super().do_HEAD()

    by_name, by_literal = redirector("localhost"), redirector("127.0.0.1")
    tars = _serve(functools.partial(TarsElsewhere, directory=str(tmp_path)))
    yield port, by_name.server_port, by_literal.server_port, tars.server_port
    for s in (file_server, by_name, by_literal, tars):
        s.shutdown()


def _verify(url: str):
    return verify(url + "/{00000..00001}.tar", decode_fraction=1.0, threads=2)


def _plait(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != remote.ENV}
    env.update(env_extra or {}, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "plait", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


REFUSED = "refused loopback address 127.0.0.1 for host 'localhost'"


def test_a_typed_loopback_host_is_read(servers):
    files, _, _, _ = servers
    report = _verify(f"http://127.0.0.1:{files}")
    assert report.num_samples == 12 and not report.problems, report.problems


def test_a_redirect_to_a_private_address_is_refused_by_name_and_by_literal(servers, monkeypatch):
    _, by_name, by_literal, _ = servers
    for typed, host in ((f"http://127.0.0.1:{by_name}", "localhost"), (f"http://localhost:{by_literal}", "127.0.0.1")):
        monkeypatch.delenv(remote.ENV, raising=False)  # what the previous URL's verify trusted
        with pytest.raises(OSError) as caught:
            _verify(typed)
        refused = remote.refused_in(caught.value)
        assert refused is not None and f"address 127.0.0.1 for host {host!r}" in refused.strerror, caught.value
        # and the command says so in one line
        proc = _plait("prep", "verify", typed + "/{00000..00001}.tar")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().count("\n") == 0 and "from a redirect" in proc.stderr, proc.stderr


def test_trusted_hosts_lift_the_rule_for_the_hosts_they_name(servers, monkeypatch):
    _, by_name, _, _ = servers
    monkeypatch.setenv(remote.ENV, "localhost")
    report = _verify(f"http://127.0.0.1:{by_name}")
    assert report.num_samples == 12 and not report.problems, report.problems


def test_score_and_filter_open_no_dataset_behind_a_refused_redirect(servers):
    from data_prep.curate.score_set import open_dataset
    files, by_name, _, _ = servers
    assert open_dataset(f"http://127.0.0.1:{files}/").shards == ["00000.tar", "00001.tar"]
    with pytest.raises(OSError) as caught:
        open_dataset(f"http://127.0.0.1:{by_name}/")
    assert remote.refused_in(caught.value) is not None


def test_training_counts_a_refused_shard_redirect_and_stops_in_one_line(servers, tmp_path):
    """The typed host serves the index files itself but redirects each tar to `localhost`."""
    _, _, _, tars_elsewhere = servers
    spec = f"http://127.0.0.1:{tars_elsewhere}/{{00000..00001}}.tar"
    proc = _plait("train", "--config", "tiny", "--set", f"data.train_shards={spec}", "--set",
                  f"train.run_dir={tmp_path / 'run'}", "--set", "data.batch_size=4", "--set", "train.steps=2",
                  "--set", "data.num_workers=0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    assert f"unreadable_shard: {spec.split('{')[0]}000" in proc.stderr + proc.stdout
    assert REFUSED in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_the_address_rule_is_what_fetch_applies():
    assert remote.check_address("10.1.2.3") == "private" and remote.check_address("169.254.169.254") == "metadata"
    assert remote.check_address("::ffff:127.0.0.1") == "loopback" and remote.check_address("8.8.8.8") is None
    assert remote.refusal("example.org", "8.8.8.8") is None
