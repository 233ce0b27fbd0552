"""`--label-col` (issue 17, part 3): integer ids or class names become `{key}.cls`, names mapped to ids in one
order for every array task, written to `classnames.txt` where `plait eval` / `plait finetune` find it; a text
label column kept without --label-col is warned about."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.cli import main
from data_prep.input.labels import label_id, plan_classnames
from data_prep.media.images import Reject
from pipeline.eval.datasets import resolve
from tests.helpers.prep_corpus import real_photos, shard_members


def _table(tmp_path, labels, name="t.csv"):
    photos = real_photos(limit=len(labels))
    for i, p in enumerate(photos):
        shutil.copy(p, tmp_path / f"{i}.jpg")
    table = tmp_path / name
    table.write_text("url,caption,label\n" + "".join(f"{i}.jpg,photo {i},{lab}\n" for i, lab in enumerate(labels)))
    return table


def _shard(*args):
    main(["shard", "--no-progress", "--processes", "1", "--image-size", "32", "--no-dedup", *args])


def test_class_names_map_to_the_same_ids_in_every_task(tmp_path):
    labels = ["sneaker", "bag", "coat", "bag", "ankle boot", "sneaker", "coat"]
    table = _table(tmp_path, labels)
    out = tmp_path / "o"
    for task in (1, 0, 2):  # three array tasks, any order: each sees a different subset of the names first
        _shard("--input", str(table), "--output", str(out), "--label-col", "label", "--samples-per-shard", "2",
               "--task-index", str(task), "--num-tasks", "3")
    main(["merge", str(out)])
    names = ["ankle boot", "bag", "coat", "sneaker"]  # sorted unique: no dependence on which task ran first
    assert (out / "classnames.txt").read_text().splitlines() == names
    samples = shard_members(out)
    assert len(samples) == len(labels)
    for key, members in samples.items():
        assert int(members["cls"]) == names.index(labels[int(key)])
    assert resolve(str(out)).classnames == tuple(names)  # what `plait eval` / `plait finetune` read
    assert main(["verify", str(out)]) == 0


def test_integer_labels_and_a_given_classnames_file(tmp_path):
    table = _table(tmp_path, [2, 0, 1, 7, ""])
    out = tmp_path / "ids"
    _shard("--input", str(table), "--output", str(out), "--label-col", "label")
    samples = shard_members(out)
    assert {k: int(m["cls"]) for k, m in samples.items()} == {"000000000": 2, "000000001": 0, "000000002": 1,
                                                              "000000003": 7}
    assert not (out / "classnames.txt").exists()  # ids need no mapping
    import pyarrow.parquet as pq
    recs = pq.read_table(out / "samples.parquet").to_pylist()
    assert recs[4]["reason"] == "missing label"

    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    table = _table(tmp_path, ["two", "one", "1", "seven"], name="n.csv")
    out = tmp_path / "given"
    _shard("--input", str(table), "--output", str(out), "--label-col", "label", "--classnames",
           str(tmp_path / "names.txt"))
    assert (out / "classnames.txt").read_text().splitlines() == ["zero", "one", "two"]
    recs = pq.read_table(out / "samples.parquet").to_pylist()
    assert [r["reason"] for r in recs] == [None, None, None, "label 'seven' not among the class names"]
    assert sorted(int(m["cls"]) for m in shard_members(out).values()) == [1, 1, 2]


def test_a_text_label_column_without_label_col_is_warned_about(tmp_path, capsys):
    table = _table(tmp_path, ["cat", "dog"])
    _shard("--input", str(table), "--output", str(tmp_path / "o"), "--extra-cols", "label")
    err = capsys.readouterr()
    assert "--label-col label" in err.out + err.err
    with pytest.raises(ValueError, match="no column 'nope'"):
        _shard("--input", str(table), "--output", str(tmp_path / "x"), "--label-col", "nope")


def test_label_mapping_is_pure():
    assert plan_classnames(["b", "a", "b", None], None) == ["a", "b"]
    assert plan_classnames(["3", 1, 2.0], None) is None
    assert plan_classnames(["x"], ["y", "x"]) == ["y", "x"]
    names = ("a", "b")
    assert label_id("b", names, {"a": 0, "b": 1}) == (1, "b")
    assert label_id(1, names, {"a": 0, "b": 1}) == (1, "b")
    with pytest.raises(Reject, match="out of range"):
        label_id(5, names, {"a": 0, "b": 1})
    assert label_id(5, None, None) == (5, None)


def test_class_names_with_line_separators_are_refused_with_their_row(tmp_path):
    # A JSONL table (JSON strings may hold any separator) whose labels include names that str.splitlines()
    # would break in two: each such row is rejected, the rest keep ids that eval reads back in the same order.
    labels = ["ant", "red\nthing", "bee", "dog\u2028x", "cat\x1cz", "bee"]
    for i, p in enumerate(real_photos(limit=len(labels))):
        shutil.copy(p, tmp_path / f"{i}.jpg")
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"url": f"{i}.jpg", "caption": f"photo {i}", "label": lab}) + "\n"
                             for i, lab in enumerate(labels)))
    out = tmp_path / "o"
    _shard("--input", str(table), "--output", str(out), "--label-col", "label")
    recs = pq.read_table(out / "samples.parquet").to_pylist()
    assert [r["reason"] for r in recs] == [None, "class name 'red\\nthing' holds a line break", None,
                                           "class name 'dog\\u2028x' holds a line break",
                                           "class name 'cat\\x1cz' holds a line break", None]
    assert resolve(str(out)).classnames == ("ant", "bee")


def test_a_classnames_file_is_read_at_newlines_only_and_checked_in_linear_time(tmp_path):
    from data_prep.input.labels import read_classnames
    from pipeline.eval.datasets import read_classnames as eval_read

    path = tmp_path / "names.txt"
    path.write_text("a\r\nb\u2028c\nd\n", newline="")
    with pytest.raises(ValueError, match="holds a line break"):
        read_classnames(str(path))
    assert eval_read(path) == ("a", "b\u2028c", "d")  # one name per \n line, as prep writes them
    many = tmp_path / "many.txt"
    many.write_text("".join(f"class {i}\n" for i in range(200_000)) + "class 7\n")
    script = f"from data_prep.input.labels import read_classnames\nread_classnames({str(many)!r})\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])  # quadratic: hours; linear: well under a second
    assert "'class 7' appears twice" in proc.stderr
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_classnames(str(path))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
@pytest.mark.parametrize("labels", [["bag", "coat", "bag", "sneaker", "coat", "bag"], [2, 0, 1, 2, 0, 1]])
def test_label_col_works_over_every_table_format(tmp_path, fmt, labels):
    import pyarrow as pa

    for i, p in enumerate(real_photos(limit=len(labels))):
        shutil.copy(p, tmp_path / f"{i}.jpg")
    rows = [{"url": f"{i}.jpg", "caption": f"photo {i}", "label": lab} for i, lab in enumerate(labels)]
    table = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), table)
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        table.write_text("".join(sep.join(map(str, r.values())) + "\n" for r in [dict(zip(rows[0], rows[0]))] + rows))
    elif fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        table.write_text(json.dumps(rows))
    out = tmp_path / "o"
    _shard("--input", str(table), "--output", str(out), "--label-col", "label")
    recs = pq.read_table(out / "samples.parquet").to_pylist()
    assert [r["status"] for r in recs] == ["ok"] * len(labels), {r["reason"] for r in recs}
    names = sorted(set(labels)) if isinstance(labels[0], str) else None
    got = {key: int(m["cls"]) for key, m in shard_members(out).items()}
    assert sorted(got.values()) == sorted(names.index(x) if names else x for x in labels)
    assert ((out / "classnames.txt").read_text().split("\n")[:-1] == names) if names else \
        not (out / "classnames.txt").exists()
