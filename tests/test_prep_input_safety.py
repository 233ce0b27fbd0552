"""Untrusted input tables and folders (issue 15, items 1-3, 5, 6): local paths stay under the roots the user named,
symlinks do not lead out of an input folder, every physical line of a table is a row (or a reject naming its line),
a resume with another input is refused, and every bad flag value is a one-line error naming the flag."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.cli import main
from data_prep.options import SourceOptions
from data_prep.input.sources import read_rows
from tests.helpers.prep_corpus import real_photos

REPO = Path(__file__).resolve().parents[1]
SECRET = b"AWS_SECRET_ACCESS_KEY=hunter2-do-not-leak\n"


def _shard(*args: str) -> None:
    main(["shard", "--no-progress", "--processes", "1", "--image-size", "32", *args])


def _records(out: Path) -> dict[int, dict]:
    return {r["row"]: r for r in pq.read_table(out / "samples.parquet").to_pylist()}


def _every_byte(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())


@pytest.fixture()
def layout(tmp_path):
    """tmp/secret/creds.txt (outside), tmp/data/{table dir}, tmp/data/imgs/{a.jpg, link.jpg -> a photo elsewhere}."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "creds.txt").write_bytes(SECRET)
    photo = real_photos(limit=1)[0]
    shutil.copy(photo, secret / "photo.jpg")  # an image outside the table's folder
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    shutil.copy(photo, data / "imgs" / "a.jpg")
    os.symlink(secret / "photo.jpg", data / "imgs" / "link.jpg")
    return tmp_path


def test_table_paths_stay_under_the_tables_folder_or_named_roots(layout):
    data, secret = layout / "data", layout / "secret"
    table = data / "t.csv"
    rows = [("imgs/a.jpg", "relative, inside"), (str(data / "imgs" / "a.jpg"), "absolute, inside"),
            ("../secret/creds.txt", "relative escape"), (str(secret / "creds.txt"), "absolute outside"),
            (f"file://{secret}/creds.txt", "file url outside"), ("/etc/hostname", "system file"),
            ("imgs/link.jpg", "symlink leaving the folder"), (f"file://{data}/imgs/../../secret/photo.jpg", "dots"),
            (f"file://{data}/imgs/a.jpg", "file url inside")]
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([("url", "caption"), *rows])
    out = layout / "out"
    _shard("--input", str(table), "--output", str(out), "--no-dedup")
    recs = _records(out)
    assert len(recs) == len(rows)
    ok = [rows[i][1] for i, r in recs.items() if r["status"] == "ok"]
    assert ok == ["relative, inside", "absolute, inside", "file url inside"]
    for i, r in recs.items():
        if r["status"] != "ok":
            assert r["reason"].startswith("local path outside the allowed folders"), (rows[i], r["reason"])
            assert r["sha256"] is None  # not even read
    assert b"hunter2" not in _every_byte(out)
    assert hashlib.sha256(SECRET).hexdigest().encode() not in _every_byte(out)

    # named roots replace the default; relative paths still start from the table's folder
    out2 = layout / "out2"
    _shard("--input", str(table), "--output", str(out2), "--no-dedup", "--local-root", str(secret),
           "--local-root", str(data))
    recs = _records(out2)
    ok = {rows[i][1] for i, r in recs.items() if r["status"] == "ok"}
    assert ok == {"relative, inside", "absolute, inside", "symlink leaving the folder", "dots", "file url inside"}
    assert recs[3]["reason"].startswith("not an image")  # creds.txt under a named root: read, not an image
    assert recs[5]["reason"].startswith("local path outside")  # /etc/hostname
    with pytest.raises(ValueError, match="--local-root"):
        _shard("--input", str(table), "--output", str(layout / "o3"), "--local-root", str(layout / "nowhere"))


def test_remote_table_refuses_local_paths_unless_a_root_is_named(layout):
    import fsspec
    photo = str(layout / "data" / "imgs" / "a.jpg")
    with fsspec.open("memory://plait-test/remote.csv", "w") as f:
        f.write(f"url,caption\n{photo},a photo\n/etc/hostname,a secret\n")
    try:
        out = layout / "out"
        _shard("--input", "memory://plait-test/remote.csv", "--output", str(out))
        assert {r["reason"].split(" (")[0] for r in _records(out).values()} == {
            "local path in a table that is not local"}
        _shard("--input", "memory://plait-test/remote.csv", "--output", str(layout / "o2"), "--local-root",
               str(layout / "data"))
        assert [r["status"] for r in _records(layout / "o2").values()] == ["ok", "rejected"]
    finally:
        fsspec.filesystem("memory").rm("plait-test", recursive=True)


def test_folder_input_does_not_follow_links_out_of_the_folder(layout):
    folder = layout / "data" / "imgs"
    (folder / "a.txt").write_text("a real caption")
    os.symlink(layout / "secret" / "creds.txt", folder / "link.txt")  # sidecar of link.jpg -> credentials
    os.symlink(folder, folder / "loop")  # a directory link back into itself: no endless walk
    os.symlink(layout / "secret", folder / "elsewhere")  # a directory link out of the folder
    out = layout / "out"
    _shard("--input", str(folder), "--output", str(out), "--allow-empty-caption")
    recs = _records(out)
    by_path = {Path(r["url"]).name: r for r in recs.values()}
    assert by_path["a.jpg"]["status"] == "ok"
    assert by_path["link.jpg"]["status"] == "rejected"
    assert by_path["link.jpg"]["reason"].startswith(("local path outside", "caption file outside"))
    assert len(recs) == 2  # nothing read through loop/ or elsewhere/
    assert b"hunter2" not in _every_byte(out)


def test_tsv_is_unquoted_and_every_line_is_a_row(tmp_path):
    photo = real_photos(limit=1)[0]
    lines = ["url\tcaption", f"{photo}\t\"quoted\" start", f"{photo}\ta 5\" tall vase", f"{photo}\tplain",
             f"{photo}\t\"never closed", f"{photo}\tlast one"]
    (tmp_path / "t.tsv").write_text("\n".join(lines) + "\n")
    rows = list(read_rows(SourceOptions(input=str(tmp_path / "t.tsv"))))
    assert [r.caption.decode() for r in rows] == [line.split("\t")[1] for line in lines[1:]]
    # a row with the wrong number of fields is a reject naming its line, not a shifted or merged row
    (tmp_path / "bad.tsv").write_text("url\tcaption\na\tb\nonly-one-field\nc\td\textra\ne\tf\n")
    rows = list(read_rows(SourceOptions(input=str(tmp_path / "bad.tsv"))))
    assert [r.skip_reason for r in rows] == [None, "tsv line 3: 1 fields, expected 2",
                                             "tsv line 4: 3 fields, expected 2", None]


def test_csv_keeps_quoting_but_an_open_quote_cannot_swallow_lines(tmp_path):
    lines = ['url,caption', 'a,"quoted, with comma"', 'b,"never closed', 'c,plain', 'd,"say ""hi"""', 'e,last']
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    rows = list(read_rows(SourceOptions(input=str(tmp_path / "t.csv"))))
    assert len(rows) == len(lines) - 1
    assert [r.url for r in rows] == ["a", None, "c", "d", "e"]
    assert rows[0].caption == b"quoted, with comma" and rows[3].caption == b'say "hi"'
    assert rows[1].skip_reason.startswith("csv line 3: ")


def test_bad_jsonl_lines_and_odd_values_are_rejects_naming_the_line(tmp_path):
    photo = real_photos(limit=1)[0]
    lines = [json.dumps({"url": photo, "caption": "fine"}), "[1, 2]", "{not json", json.dumps({"url": photo,
             "caption": 42}), json.dumps({"url": photo, "caption": ["a", "list"]}), "", json.dumps("a string"),
             json.dumps({"url": ["x"], "caption": "url is a list"}), json.dumps({"url": photo, "caption": "end"})]
    table = tmp_path / "t.jsonl"
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    _shard("--input", str(table), "--output", str(out), "--no-dedup", "--local-root", "/usr/share/doc")
    recs = _records(out)
    assert len(recs) == 8  # every non-empty line, in order
    reasons = [recs[i]["reason"] for i in range(8)]
    assert reasons[0] is None and reasons[7] is None
    assert reasons[1] == "jsonl line 2: not an object (list)"
    assert reasons[2].startswith("jsonl line 3: invalid JSON")
    assert reasons[3] == "caption is not text (int)" and reasons[4] == "caption is not text (list)"
    assert reasons[5] == "jsonl line 7: not an object (str)"
    assert reasons[6] == "url is not text (list)"


def test_video_window_columns_that_are_not_numbers_are_rejects(tmp_path):
    (tmp_path / "t.csv").write_text("url,caption,start,end\na,x,1.5,3\nb,y,soon,3\nc,z,1,nan\n")
    rows = list(read_rows(SourceOptions(input=str(tmp_path / "t.csv"), start_col="start", end_col="end")))
    assert rows[0].start_s == 1.5 and rows[0].skip_reason is None
    assert rows[1].skip_reason == "start 'soon' is not a number of seconds"
    assert rows[2].skip_reason == "end 'nan' is not a number of seconds"


def test_resume_or_array_task_with_another_input_is_refused(tmp_path):
    photos = real_photos(limit=4)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for path, ps in ((a, photos[:2]), (b, photos[2:])):
        path.write_text("url,caption\n" + "".join(f"{p},photo\n" for p in ps))
    common = ["--local-root", "/usr/share/doc", "--samples-per-shard", "1"]
    _shard("--input", str(a), "--output", str(tmp_path / "o"), "--task-index", "0", "--num-tasks", "2", *common)
    with pytest.raises(ValueError, match="--input"):
        _shard("--input", str(b), "--output", str(tmp_path / "o"), "--task-index", "1", "--num-tasks", "2", *common)
    # the same path with other content (a table rewritten between tasks) is another input too
    os.utime(a, (1, 1))
    with pytest.raises(ValueError, match="--input .* changed"):
        _shard("--input", str(a), "--output", str(tmp_path / "o"), "--task-index", "1", "--num-tasks", "2", *common)
    # the same file under another spelling of its path is the same input
    os.chdir(tmp_path)
    _shard("--input", "a.csv", "--output", str(tmp_path / "p"), *common)
    _shard("--input", str(a), "--output", str(tmp_path / "p"), *common)


BAD_FLAGS = [("--timeout", "inf"), ("--timeout", "nan"), ("--timeout", "0"), ("--backoff", "-1"),
             ("--backoff", "nan"), ("--max-retry-after", "inf"), ("--max-retry-after", "-2"),
             ("--max-aspect-ratio", "nan"), ("--max-aspect-ratio", "0.5"), ("--fps", "inf"), ("--fps", "nan"),
             ("--fps", "0"), ("--max-duration", "nan"), ("--max-duration", "0"), ("--image-size", "0"),
             ("--encode-quality", "101"), ("--min-image-size", "-1"), ("--max-pixels", "0"),
             ("--max-caption-length", "0"), ("--retries", "-1"), ("--max-per-host", "0"), ("--threads", "-3"),
             ("--max-bytes", "0"), ("--max-redirects", "-1"), ("--num-frames", "0"), ("--max-frames", "0"),
             ("--samples-per-shard", "0"), ("--processes", "0"), ("--max-decode-bytes", "0")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_every_bad_flag_value_is_a_one_line_error_naming_the_flag(tmp_path, capsys, flag, value):
    import plait
    (tmp_path / "t.csv").write_text("url,caption\nx.jpg,x\n")
    argv = ["prep", "shard", "--input", str(tmp_path / "t.csv"), "--output", str(tmp_path / "o"), flag, value]
    try:
        code = plait.main(argv)
    except SystemExit as e:  # argparse's own errors (a value of the wrong type)
        code = e.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(("plait prep: error: ", "plait prep shard: error: ")), lines
    assert flag in lines[-1] and value in lines[-1], lines[-1]
    assert not (tmp_path / "o").exists()


def test_an_endless_line_is_a_reject_read_in_bounded_pieces(tmp_path, monkeypatch):
    from data_prep.input import sources
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 64)
    long = "x" * 300
    (tmp_path / "t.csv").write_text(f"url,caption\na,short\nb,{long}\nc,after\n")
    (tmp_path / "t.jsonl").write_text('{"url": "a", "caption": "s"}\n' + json.dumps({"url": "b", "caption": long})
                                      + '\n{"url": "c", "caption": "after"}\n')
    (tmp_path / "t.txt").write_text(f"a\nhttp://{long}\nc\n")
    for name, kind in (("t.csv", "csv"), ("t.jsonl", "jsonl"), ("t.txt", "txt")):
        rows = list(read_rows(SourceOptions(input=str(tmp_path / name))))
        assert [r.url for r in rows] == ["a", None, "c"], name
        line = 3 if kind == "csv" else 2
        assert rows[1].skip_reason == f"{kind} line {line}: longer than 64 bytes", (name, rows[1].skip_reason)


def test_kept_values_are_strict_json_and_sidecar_captions_are_bounded(tmp_path, monkeypatch):
    from data_prep.input import sources
    photo = real_photos(limit=1)[0]
    shutil.copy(photo, tmp_path / "a.jpg")
    shutil.copy(photo, tmp_path / "b.jpg")
    (tmp_path / "t.jsonl").write_text('{"url": "a.jpg", "caption": "x", "score": NaN, "vec": [1, Infinity]}\n')
    out = tmp_path / "out"
    _shard("--input", str(tmp_path / "t.jsonl"), "--output", str(out), "--extra-cols", "score,vec")
    import tarfile

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a sample's json"))
    with tarfile.open(out / "00000.tar") as tar:
        meta = strict(tar.extractfile("000000000.json").read())
    assert meta["score"] is None and meta["vec"] == [1, None]

    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(photo, folder / "a.jpg")
    (folder / "a.txt").write_text("y" * 50)
    monkeypatch.setattr(sources, "MAX_CAPTION_FILE_BYTES", 20)
    rows = list(read_rows(SourceOptions(input=str(folder), input_format="folder")))
    assert rows[0].caption is None and rows[0].skip_reason == "caption file larger than 20 bytes"
