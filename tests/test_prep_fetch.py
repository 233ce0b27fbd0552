"""Fetch behaviour against the local HTTP server: connection reuse, per-host cap, user agent; fsspec in/out
(memory:// stands in for object stores); dedup against an earlier dataset."""
from __future__ import annotations

import json

import fsspec
import pyarrow.parquet as pq

from data_prep.cli import main
from data_prep.fetch.fetcher import Fetcher
from data_prep.options import FetchOptions
from tests.helpers.prep_corpus import CorpusServer, jpeg_bytes, asymmetric_rgb, real_photos


def test_keep_alive_host_cap_and_user_agent():
    with CorpusServer({"a.jpg": b"abc"}) as srv:
        f = Fetcher(FetchOptions(allow_private=True, threads=1, user_agent_token="mailto:data@example.org"))
        assert [f.fetch(srv.url("/files/a.jpg")) for _ in range(5)] == [b"abc"] * 5
        assert len(srv.peers) == 1  # one connection reused for all five requests
        assert srv.user_agents == {"plait-prep/0.1 (+mailto:data@example.org)"}
        capped = Fetcher(FetchOptions(allow_private=True, threads=8, max_per_host=2))
        out = list(capped.fetch_many([srv.url("/sleepy.jpg")] * 8))
        assert all(isinstance(b, bytes) for b in out)
        assert srv.max_active == 2


def test_fsspec_input_and_output_and_dedup_against_earlier(tmp_path):
    photos = real_photos(limit=6)
    fs = fsspec.filesystem("memory")
    fs.pipe("/in/table.jsonl", "".join(json.dumps({"url": p, "caption": f"p{i}"}) + "\n"
                                        for i, p in enumerate(photos)).encode())
    roots = ["--local-root", "/usr/share/doc/opencv-doc", "--local-root", str(tmp_path)]  # a remote table: no default
    main(["shard", "--input", "memory://in/table.jsonl", "--output", "memory://out", "--processes", "1",
          "--no-progress", "--image-size", "64", *roots])
    assert json.loads(fs.cat("/out/sizes.json")) == {"00000.tar": 6}
    assert not [p for p in fs.find("/out") if p.endswith(".tmp")]
    assert main(["verify", "memory://out"]) == 0

    first = tmp_path / "first"
    main(["shard", "--input", "memory://in/table.jsonl", "--output", str(first), "--processes", "1",
          "--no-progress", "--image-size", "64", *roots])
    extra = tmp_path / "new.jpg"
    extra.write_bytes(jpeg_bytes(asymmetric_rgb(80, 80)))
    fs.pipe("/in/more.jsonl", "".join(json.dumps({"url": p, "caption": "again"}) + "\n"
                                       for p in [photos[2], str(extra)]).encode())
    second = tmp_path / "second"
    main(["shard", "--input", "memory://in/more.jsonl", "--output", str(second), "--processes", "1",
          "--no-progress", "--dedup-against", str(first / "samples.parquet"), *roots])
    recs = pq.read_table(second / "samples.parquet").to_pylist()
    assert [r["reason"] for r in recs] == ["duplicate of an earlier dataset", None]
