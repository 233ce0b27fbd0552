"""Input formats (streamed), fashion-mnist as a named format, and the --help a new user reads."""
from __future__ import annotations

import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.cli import main
from data_prep.options import SourceOptions
from data_prep.input.sources import (FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES, fashion_mnist_caption, read_rows,
                               with_article)

FMNIST = "/usr/share/datasets/fashion-mnist"


def _rows(path, **kw):
    return list(read_rows(SourceOptions(input=str(path), **kw)))


def test_table_formats_give_the_same_rows(tmp_path):
    recs = [{"url": f"/img/{i}.jpg", "caption": f"cap {i}", "src": "x"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "t.parquet", row_group_size=2)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    csv_text = "url,caption,src\n" + "".join(f"{r['url']},{r['caption']},x\n" for r in recs)
    with gzip.open(tmp_path / "t.csv.gz", "wt") as f:
        f.write(csv_text)
    (tmp_path / "t.tsv").write_text(csv_text.replace(",", "\t"))
    expected = [(i, f"/img/{i}.jpg", f"cap {i}", {"src": "x"}) for i in range(5)]
    for name in ("t.parquet", "t.jsonl", "t.csv.gz", "t.tsv"):
        rows = _rows(tmp_path / name, extra_cols=("src",))
        got = [(r.index, r.url, r.caption.decode() if isinstance(r.caption, bytes) else r.caption, r.extra)
               for r in rows]
        assert got == expected, name
    (tmp_path / "u.txt").write_text("http://a/1.jpg\n\nhttp://a/2.jpg\n")
    assert [r.url for r in _rows(tmp_path / "u.txt")] == ["http://a/1.jpg", "http://a/2.jpg"]
    with pytest.raises(ValueError, match="no column 'link'"):
        _rows(tmp_path / "t.parquet", url_col="link")
    with pytest.raises(FileNotFoundError, match="no such"):
        _rows(tmp_path / "missing.csv")


def test_yfcc100m_dump(tmp_path):
    def line(i, title, desc, tags, marker):
        cols = [str(i), f"{1000 + i}", "hash", "nsid", "nick", "2010", "2011", "cam", title, desc, tags, "", "", "",
                "", "page", f"http://farm.example/{i}.jpg", "CC-BY", "lic", "s", "f", "sec", "so", "jpg", marker]
        return "\t".join(cols) + "\n"

    path = tmp_path / "yfcc100m_dataset.gz"
    with gzip.open(path, "wt") as f:
        f.write(line(0, "Golden+Gate", "At+sunset%21", "bridge,sf", "0"))
        f.write(line(1, "A+clip", "", "", "1"))
    rows = _rows(path, input_format="yfcc100m", yfcc_caption=("title", "description", "tags"))
    assert rows[0].caption == "Golden Gate. At sunset!. bridge, sf"
    assert rows[0].url == "http://farm.example/0.jpg" and rows[0].extra["photo_id"] == "1000"
    assert rows[1].skip_reason == "yfcc row is a video (marker 1)"


def test_fashion_mnist_named_format(tmp_path):
    out = tmp_path / "fm"
    main(["shard", "--input", FMNIST, "--input-format", "fashion-mnist", "--split", "test", "--output", str(out),
          "--samples-per-shard", "4000", "--processes", "1", "--no-progress"])
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 4000, "00001.tar": 4000, "00002.tar": 2000}
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()[:4]
        assert names == ["000000000.jpg", "000000000.txt", "000000000.json", "000000000.cls"]
        img = Image.open(io.BytesIO(tar.extractfile(names[0]).read()))
        meta = json.loads(tar.extractfile(names[2]).read())
        cls = int(tar.extractfile(names[3]).read())
        caption = tar.extractfile(names[1]).read().decode()
    assert img.size == (28, 28) and img.mode == "RGB"  # never upscaled
    assert meta["cls"] == cls and meta["label"] == FASHION_MNIST_CLASSES[cls]
    assert caption == fashion_mnist_caption(0, cls) and with_article(FASHION_MNIST_CLASSES[cls]) in caption
    assert {fashion_mnist_caption(i, 9) for i in range(50)} == {t.format("an ankle boot")
                                                                 for t in FASHION_MNIST_TEMPLATES}
    assert main(["verify", str(out)]) == 0
    with pytest.raises(FileNotFoundError, match="missing"):
        main(["shard", "--input", str(tmp_path), "--input-format", "fashion-mnist", "--output", str(tmp_path / "x")])


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--input-format", "--resize-mode", "--allow-private-addresses", "--task-index", "--num-frames",
                 "(default: 256)", "sizes.json", "kill -9"):
        assert flag in text
    with pytest.raises(ValueError, match="--resize-mode"):
        from data_prep.options import ImageOptions
        ImageOptions(resize_mode="stretch")


def test_txt_url_list_needs_no_caption_and_empty_folder_is_an_error(tmp_path):
    from tests.helpers.prep_corpus import real_photos
    (tmp_path / "urls.txt").write_text("".join(f"file://{p}\n" for p in real_photos(limit=3)))
    main(["shard", "--input", str(tmp_path / "urls.txt"), "--output", str(tmp_path / "o"), "--processes", "1",
          "--no-progress", "--local-root", "/usr/share/doc/opencv-doc"])
    assert json.loads((tmp_path / "o" / "sizes.json").read_text()) == {"00000.tar": 3}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image or video files"):
        main(["shard", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "x")])


def test_every_shard_flag_is_a_documented_field_and_old_spellings_still_work(tmp_path):
    import dataclasses
    import typing

    from data_prep.cli import SECTIONS, build_parser, job_options
    from pipeline.options import flag_of
    shard = build_parser()._subparsers._group_actions[0].choices["shard"]
    by_dest = {}
    for action in shard._actions:
        by_dest.setdefault(action.dest, action)  # the field's own flag, added before its negative aliases
    for _, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("no_flag") or dataclasses.is_dataclass(hints[f.name]):
                continue
            action = by_dest[f.name]
            assert action.option_strings[0] == flag_of(f.name), f.name  # the flag is the field's name
            assert len(action.help) > 20, f.name  # documented from the field's docstring
    (tmp_path / "t.csv").write_text("url,caption\na.jpg,x\n")
    base = ["shard", "--input", str(tmp_path / "t.csv"), "--output", str(tmp_path / "o")]
    old = ["--timeout", "3", "--backoff", "0.1", "--max-retry-after", "5", "--max-duration", "9",
           "--allow-private-addresses", "--ignore-opt-outs", "--no-keep-original", "--no-dedup", "--no-progress"]
    new = ["--timeout-s", "3", "--backoff-s", "0.1", "--max-retry-after-s", "5", "--max-duration-s", "9",
           "--allow-private", "--no-respect-optouts", "--no-keep-original-jpeg", "--no-dedup", "--no-progress"]
    parser = build_parser()
    a, b = job_options(parser.parse_args(base + old)), job_options(parser.parse_args(base + new))
    assert a == b and a.fetch.timeout_s == 3 and not a.fetch.respect_optouts and not a.image.keep_original_jpeg
    assert a.video.max_duration_s == 9 and a.fetch.allow_private and not a.dedup
    defaults = job_options(parser.parse_args(base))
    assert defaults.image == type(defaults.image)() and defaults.fetch == type(defaults.fetch)()
