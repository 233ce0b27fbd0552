"""`plait prep verify` on any WebDataset folder (not only plait's), on hostile tars (directories, symlinks,
pickles), on a dataset whose every row was rejected; `repair` / `verify --fix` rebuilding damaged shards."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from data_prep.cli import main
from data_prep.maintenance.verify import verify
from tests.helpers.prep_corpus import real_photos

from tests.helpers.fmnist_fixture import encode, read_fmnist


def _table(tmp_path: Path, urls: list[str]) -> Path:
    table = tmp_path / "in.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows([u, f"photo {i}"] for i, u in enumerate(urls))
    return table


def _shard(table: Path, out: Path, per: int) -> None:
    main(["shard", "--input", str(table), "--output", str(out), "--samples-per-shard", str(per),
          "--image-size", "48", "--processes", "1", "--no-progress", "--local-root", "/usr/share/doc/opencv-doc"])


def _writer_folder(folder: Path, shards: int = 2, per: int = 4) -> None:
    images, _ = read_fmnist("train", shards * per)
    folder.mkdir()
    with wds.ShardWriter(str(folder / "part-%03d.tar"), maxcount=per, verbose=0) as sink:
        for i in range(shards * per):
            sink.write({"__key__": f"s{i:04d}", "jpg": encode(images[i], "jpg"), "txt": f"item {i}"})


class _Trap:
    """Unpickling this writes a file: proof that a member was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def _append(tar_path: Path, members: list[tarfile.TarInfo], payloads: list[bytes | None]) -> None:
    with tarfile.open(tar_path, "a") as tar:
        for info, data in zip(members, payloads):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def test_verify_any_webdataset_folder(tmp_path, capsys):
    folder = tmp_path / "wds"
    _writer_folder(folder)
    assert main(["verify", str(folder), "--decode-fraction", "1"]) == 0
    out = capsys.readouterr().out
    assert "8 samples in 2 shard(s)" in out and "not a plait dataset (no _plan.json): row accounting skipped" in out

    # damage of every kind the check covers; one pickle member that must never be unpickled
    marker = tmp_path / "unpickled.txt"
    images, _ = read_fmnist("train", 1)
    bad_jpg = encode(images[0], "jpg")[:60]
    members, payloads = [], []
    good_jpg = encode(images[0], "jpg")
    for name, data in (("s9000.jpg", bad_jpg), ("s9000.txt", b"truncated image"), ("s9001.jpg", good_jpg),
                       ("s0001.txt", b"key of part-000"), ("s0001.jpg", good_jpg),
                       ("s9002.txt", b"\xff\xfe not utf-8"), ("s9002.jpg", good_jpg),
                       ("s9002.pyd", pickle.dumps(_Trap(marker)))):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        members.append(info)
        payloads.append(data)
    # appended after part-001's own members (tarfile's append mode rewrites the end-of-archive blocks)
    _append(folder / "part-001.tar", members, payloads)
    (folder / "sizes.json").write_text(json.dumps({"part-000.tar": 4, "part-001.tar": 4}))
    (folder / "part-000_stats.json").write_text(json.dumps({"successes": 5}))  # img2dataset's, overstated
    report = verify(str(folder), decode_fraction=1.0)
    text = "\n".join(report.problems)
    assert "part-001.tar: s9000.jpg does not decode as jpg" in text
    assert "part-001.tar: sample s9001 lacks a text member" in text
    assert "part-001.tar: key s0001 also in part-000.tar" in text
    assert "part-001.tar: s9002.txt does not decode as txt" in text
    assert "part-001.tar: sizes.json says 4, the tar holds 8 samples" in text
    assert "part-000_stats.json: successes 5, the tar holds 4 samples" in text
    assert not marker.exists(), "verify unpickled a .pyd member"
    assert main(["verify", str(folder)]) == 1


def test_directory_and_symlink_members_are_reported_not_crashed_on(tmp_path, capsys):
    photos = real_photos(limit=6)
    out = tmp_path / "o"
    _shard(_table(tmp_path, [f"file://{p}" for p in photos]), out, per=3)
    d = tarfile.TarInfo("000000000.d")
    d.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("000000000.lnk.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("000000001.x.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "missing-target.jpg"
    _append(out / "00000.tar", [d, link, hard], [None, None, None])
    assert main(["verify", str(out)]) == 1  # before: a traceback from extractfile on the links
    text = capsys.readouterr().out
    assert "00000.tar: member '000000000.d' is a directory, not a file" in text
    assert "member '000000000.lnk.jpg' is a symlink" in text and "member '000000001.x.jpg' is a hard link" in text
    assert "00000.tar: sha256 differs from manifest.json" in text


def test_every_row_rejected_is_not_ok(tmp_path, capsys):
    table = _table(tmp_path, [f"file://{tmp_path}/missing-{i}.jpg" for i in range(5)])
    out = tmp_path / "o"
    _shard(table, out, per=3)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "0 samples in 2 shard(s)" in text
    assert "5 input rows: 0 ok, 5 rejected; top reject reasons:" in text
    assert "the dataset holds no samples (all 5 input rows rejected)" in text
    assert "\nok\n" not in f"\n{text}"


@pytest.mark.parametrize("how", ["repair", "verify --fix"])
def test_damaged_shards_are_rebuilt(tmp_path, how):
    photos = real_photos(limit=9)
    out = tmp_path / "o"
    _shard(_table(tmp_path, [f"file://{p}" for p in photos]), out, per=3)
    originals = {n: (out / n).read_bytes() for n in ("00000.tar", "00001.tar", "00002.tar")}
    flipped = bytearray(originals["00001.tar"])
    flipped[900] ^= 0xFF
    (out / "00001.tar").write_bytes(bytes(flipped))
    (out / "00002.tar").write_bytes(originals["00002.tar"][:2000])
    assert sorted(verify(str(out), decode_fraction=0).bad_shards) == ["00001.tar", "00002.tar"]
    if how == "repair":
        main(["repair", str(out), "--processes", "1", "--no-progress"])
        assert main(["verify", str(out), "--decode-fraction", "1"]) == 0
    else:
        assert main(["verify", str(out), "--fix", "--processes", "1"]) == 0
    assert {n: (out / n).read_bytes() for n in originals} == originals  # deterministic rebuild: the same bytes


def test_repair_refuses_foreign_folders_with_a_clear_message(tmp_path):
    folder = tmp_path / "wds"
    _writer_folder(folder)
    with pytest.raises(FileNotFoundError, match="not a plait dataset folder .*plait prep index"):
        main(["repair", str(folder), "--no-progress"])


def test_verify_decodes_exactly_what_training_decodes(tmp_path, capsys):
    # One shard: a JPEG sample (fine), a BMP-only sample and a GIF beside a JPEG (other formats: not trainable,
    # never decoded), and a few-KB PNG claiming more pixels than the decoders' cap (refused from its header).
    from PIL import Image

    from data_prep.shards.members import MAX_DECODE_PIXELS
    from pipeline.data.transforms import decode_member as train_decode

    def encoded(img, fmt):
        buf = io.BytesIO()
        img.save(buf, fmt)
        return buf.getvalue()

    side = int(MAX_DECODE_PIXELS ** 0.5) + 1
    bomb = encoded(Image.new("1", (side, side)), "PNG")
    jpeg = encoded(Image.new("RGB", (32, 32), "red"), "JPEG")
    out = tmp_path / "ds"
    out.mkdir()
    with wds.TarWriter(str(out / "00000.tar")) as w:
        w.write({"__key__": "ok", "jpg": jpeg, "txt": b"fine"})
        w.write({"__key__": "bmp", "bmp": encoded(Image.new("RGB", (8, 8)), "BMP"), "txt": b"bmp only"})
        w.write({"__key__": "gif", "jpg": jpeg, "gif": encoded(Image.new("P", (8, 8)), "GIF"), "txt": b"extra"})
        w.write({"__key__": "bomb", "png": bomb, "txt": b"too many pixels"})
    assert main(["index", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--decode-fraction", "1"]) == 1
    text = capsys.readouterr().out
    assert "00000.tar: bmp.bmp is a .bmp image: not trainable (plait reads JPEG, PNG, WEBP images)" in text
    assert "00000.tar: gif.gif is a .gif image: not trainable" in text
    assert "00000.tar: bomb.png does not decode as png (ValueError: image of 8193x8193 pixels is above" in text
    assert "ok.jpg" not in text
    with pytest.raises(ValueError, match="above the .*-pixel limit"):
        train_decode("png", bomb)  # the same verdict in training


@pytest.mark.slow
def test_reading_records_starts_no_arrow_thread(tmp_path):
    # The abort at exit came from Arrow's I/O threads, started when Arrow read through a Python file object and
    # still holding it while the interpreter finalized. Reading a records file must start no thread at all: count
    # the process's native threads (/proc/self/task) around the read in a fresh interpreter.
    import subprocess
    import sys

    photos = real_photos(limit=3)
    out = tmp_path / "ds"
    _shard(_table(tmp_path, [f"file://{p}" for p in photos]), out, per=4)
    script = (
        "import os, sys\n"
        "from data_prep.shards import manifest\n"
        "from data_prep.shards.writer import OutputDir\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "table = manifest.read_records(OutputDir(sys.argv[1]), 'samples.parquet', ['row', 'status'])\n"
        "print(table.num_rows, len(os.listdir('/proc/self/task')) - before)\n")
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "0"], done.stdout


def test_verify_exits_cleanly_run_after_run_and_in_concurrent_pairs(tmp_path):
    # `plait prep verify DIR && plait train ...` needs exit 0 every time: verify once imported torch (through the
    # loader's tar reader), whose threads aborted the interpreter at exit in about half the runs ("terminate
    # called without an active exception", exit 134), more often with two verifies of one folder at once.
    import subprocess
    import sys

    photos = real_photos(limit=6)
    out = tmp_path / "ds"
    _shard(_table(tmp_path, [f"file://{p}" for p in photos * 4]), out, per=4)
    command = [sys.executable, "-m", "data_prep", "verify", str(out)]
    codes = []
    for _ in range(10):
        pair = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
        codes += [(p.wait(timeout=300), p.stderr.read().decode()[-300:]) for p in pair]
    assert [c for c, _ in codes] == [0] * 20, [c for c in codes if c[0]]
