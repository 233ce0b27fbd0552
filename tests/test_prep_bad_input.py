"""Issue 3's bad-input corpus through the real CLI, half of it served by a local HTTP server on 127.0.0.1."""
from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.cli import main
from data_prep.fetch.fetcher import check_address, redact
from tests.helpers.prep_corpus import (CorpusServer, asymmetric_rgb, broken_images, jpeg_bytes, shard_members, tricky_images,
                               with_orientation)


def _records(out):
    t = pq.read_table(out / "samples.parquet").to_pylist()
    return {r["row"]: r for r in t}


@pytest.fixture(scope="module")
def corpus():
    files = {name: data for name, (data, _) in broken_images().items()}
    files.update(tricky_images())
    files["ok.jpg"] = jpeg_bytes(asymmetric_rgb(320, 240))
    return files


def test_bad_input_corpus_every_row_gets_its_reason(tmp_path, corpus):
    broken = broken_images()
    rows = []  # (url, caption, expected reason kind or None)
    with CorpusServer(corpus) as srv:
        for name, (_, reason) in broken.items():
            rows.append((srv.url(f"/files/{name}"), f"broken {name}", reason))
        for name in tricky_images():
            rows.append((srv.url(f"/files/{name}"), f"tricky {name}", None))
        rows += [(srv.url("/status/404"), "missing", "http 404"),
                 (srv.url("/status/500"), "server error", "http 500"),
                 (srv.url("/always-429"), "rate limited", "http 429"),
                 (srv.url("/retry-after"), "rate limited once", None),
                 (srv.url("/drip"), "slow drip", "timeout"),
                 (srv.url("/loop-a"), "loop", "redirect loop"),
                 (srv.url("/redirect-ok"), "redirect then ok", None),
                 (srv.url("/noai"), "opted out", "opt-out"),
                 (srv.url("/files/ok.jpg"), "", "empty caption"),
                 (srv.url("/files/ok.jpg").replace("http://", "http://user:hunter2@"), "creds", "duplicate")]
        table = tmp_path / "in.csv"
        with open(table, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            w.writerows((u, c) for u, c, _ in rows)
        with open(table, "ab") as f:  # a caption that is not UTF-8
            f.write(srv.url("/files/ok.jpg").encode() + b",caf\xe9 au lait\n")
        rows.append((None, None, "caption is not valid UTF-8"))
        out = tmp_path / "out"
        main(["shard", "--input", str(table), "--output", str(out), "--processes", "1", "--no-progress",
              "--allow-private-addresses", "--timeout", "1.5", "--retries", "1", "--backoff", "0.05",
              "--max-aspect-ratio", "20", "--samples-per-shard", "8"])
        assert srv.hits["/retry-after"] == 2  # retried once after honouring Retry-After
    recs = _records(out)
    assert len(recs) == len(rows)
    for i, (url, caption, reason) in enumerate(rows):
        rec = recs[i]
        if reason is None:
            assert rec["status"] == "ok", (caption, rec["reason"])
        else:
            assert rec["status"] == "rejected" and rec["reason"].startswith(reason), (caption, rec["reason"])
    transient = {recs[i]["reason"].split(" (")[0] for i in recs if recs[i]["transient"]}
    assert transient == {"http 500", "http 429", "timeout"}
    assert "hunter2" not in (out / "samples.parquet").read_bytes().decode("latin-1")
    samples = shard_members(out)
    assert len(samples) == sum(r["status"] == "ok" for r in recs.values())
    for key, members in samples.items():
        media = next(v for k, v in members.items() if k in ("jpg", "png", "webp"))
        img = Image.open(io.BytesIO(media))
        assert img.mode == "RGB"
        meta = json.loads(members["json"])
        assert meta["key"] == key and meta["status"] == "success"
    assert main(["verify", str(out)]) == 0


def test_private_addresses_refused_by_default(tmp_path):
    with CorpusServer({}) as srv:
        table = tmp_path / "in.jsonl"
        table.write_text(json.dumps({"url": srv.url("/files/x.jpg"), "caption": "x"}) + "\n" +
                         json.dumps({"url": "http://169.254.169.254/latest/meta-data/", "caption": "y"}) + "\n")
        out = tmp_path / "out"
        main(["shard", "--input", str(table), "--output", str(out), "--processes", "1", "--no-progress"])
        assert srv.hits == {}
    recs = _records(out)
    assert recs[0]["reason"].startswith("refused loopback address")
    assert recs[1]["reason"].startswith("refused metadata address")
    assert check_address("10.1.2.3") == "private" and check_address("8.8.8.8") is None
    assert check_address("::ffff:127.0.0.1") == "loopback"


def test_redact_removes_credentials():
    assert redact("https://bob:pw@host/a.jpg?X-Amz-Signature=abc&w=3") == \
        "https://host/a.jpg?X-Amz-Signature=REDACTED&w=3"


def test_exif_orientations_are_applied(tmp_path):
    upright = asymmetric_rgb(64, 40)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for o in range(2, 9):
        (folder / f"o{o}.jpg").write_bytes(with_orientation(upright, o))
        (folder / f"o{o}.txt").write_text(f"orientation {o}")
    out = tmp_path / "out"
    main(["shard", "--input", str(folder), "--output", str(out), "--processes", "1", "--no-progress",
          "--encode-format", "png"])
    samples = shard_members(out)
    assert len(samples) == 7
    for members in samples.values():
        img = Image.open(io.BytesIO(members["png"])).convert("RGB")
        assert img.size == (64, 40), img.size
        r, g, b = img.getpixel((3, 3))  # red corner back at top-left
        assert r > 200 and b < 60, (json.loads(members["json"])["caption"], (r, g, b))
