"""A local S3 server (moto) for the s3:// tests, as a pytest fixture: `from tests.helpers.s3_server import s3`."""
from __future__ import annotations

import logging

import fsspec
import pytest

moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]' (the test extras)")


@pytest.fixture()
def s3(monkeypatch):
    """An s3fs filesystem on a fresh moto server with the bucket `plait-test`."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    # credentials and endpoint through the environment, as on a cluster node; worker processes inherit them
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    type(fs).clear_instance_cache()  # filesystems cached by an earlier test talk to that test's server
    if not fs.exists("plait-test"):  # moto keeps its buckets for the whole test process
        fs.mkdir("plait-test")
    yield fs
    server.stop()
