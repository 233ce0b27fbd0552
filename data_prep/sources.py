"""Input readers: every supported input format streamed as `Row`s, one per input row, in input order.

Readers never hold the whole input: parquet is read row group by row group, csv/tsv in blocks through pyarrow's
streaming reader (gzip handled by fsspec), jsonl and txt line by line, folders by a sorted walk. Peak memory
depends on the block size, not on the number of rows. `Row.index` is the position in the input, the only thing
keys and shards are derived from.

Named formats: `yfcc100m` (the tab-separated metadata dump), `webvid` (its CSV layout), `fashion-mnist` (idx gz
files with inline pixels; class names and caption templates exported as constants for the demo's zero-shot
evaluation, which should use other templates than the training ones).
"""
from __future__ import annotations

import gzip
import json
import random
import struct
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import fsspec

from data_prep.options import SourceOptions

FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
"""Class names in label order (label i is FASHION_MNIST_CLASSES[i])."""

FASHION_MNIST_TEMPLATES = ("a photo of {}", "a product shot of {}", "an image of {}", "a picture of {}",
                           "a close-up photo of {}")
"""Training caption templates; `{}` takes the class name with its article (see `with_article`)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")
_FMNIST_FILES = {"train": "train", "test": "t10k"}
_YFCC_COLUMNS = 25  # the Webscope/AWS dump: line number and hash first, photo/video marker last


def with_article(name: str) -> str:
    """'sneaker' -> 'a sneaker', 'ankle boot' -> 'an ankle boot'."""
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def fashion_mnist_caption(index: int, label: int) -> str:
    """The training caption of row `index`: a template drawn by a generator seeded with the row index."""
    template = FASHION_MNIST_TEMPLATES[random.Random(index).randrange(len(FASHION_MNIST_TEMPLATES))]
    return template.format(with_article(FASHION_MNIST_CLASSES[label]))


@dataclass
class Row:
    index: int
    """Position in the input (0-based); the sample key is derived from it."""
    url: str | None = None
    """Path or URL of the media to fetch; None when the media is inline."""
    caption: str | bytes | None = None
    """Raw caption; bytes when the input could not be decoded (checked and cleaned by the processor)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Kept input columns, copied into the sample's json."""
    pixels: tuple[str, tuple[int, int], bytes] | None = None
    """Inline raw pixels (Pillow mode, (width, height), bytes), for datasets such as fashion-mnist."""
    skip_reason: str | None = None
    """Set by a reader that already knows the row must be rejected (e.g. a YFCC video row)."""
    start_s: float | None = None
    end_s: float | None = None


def detect_format(path: str) -> str:
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        return "folder"
    if not fs.exists(root):
        raise FileNotFoundError(f"--input {path!r}: no such file or folder")
    name = root.lower().removesuffix(".gz").removesuffix(".bz2")
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                        (".json", "json"), (".txt", "txt")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"--input {path!r}: cannot tell the format from the name; pass --input-format")


RowRanges = Callable[[int, int], "list[tuple[int, int]]"]
"""(start, stop) -> the [a, b) parts of rows [start, stop) a caller wants (see `read_rows`)."""


def read_rows(opts: SourceOptions, ranges: RowRanges | None = None) -> Iterator[Row]:
    """All rows of the input, in order, streamed.

    With `ranges`, a reader that knows its rows' positions before decoding them (parquet: its row groups'
    metadata) yields only the wanted rows and never reads the row groups that hold none: an array task of a
    100M-row job reads its own share, not the whole table (benchmarks/bench_scale.py). Other readers ignore
    `ranges` and yield every row; callers filter by index either way."""
    fs, root = fsspec.core.url_to_fs(opts.input)
    if not fs.exists(root):
        raise FileNotFoundError(f"--input {opts.input!r}: no such file or folder")
    fmt = detect_format(opts.input) if opts.input_format == "auto" else opts.input_format
    reader = {"parquet": _parquet, "csv": _csv, "tsv": _csv, "webvid": _csv, "jsonl": _jsonl, "json": _jsonl,
              "txt": _txt, "folder": _folder, "yfcc100m": _yfcc, "fashion-mnist": _fashion_mnist}[fmt]
    if fmt == "parquet":
        yield from _parquet(opts, fmt, ranges)
    else:
        yield from reader(opts, fmt)


def count_rows(opts: SourceOptions) -> int | None:
    """The input's row count when it is known without reading the rows (parquet metadata), else None."""
    fmt = detect_format(opts.input) if opts.input_format == "auto" else opts.input_format
    if fmt != "parquet":
        return None
    import pyarrow.parquet as pq

    with fsspec.open(opts.input, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _table_row(index: int, rec: dict[str, Any], opts: SourceOptions, url_col: str,
               caption_col: str | None) -> Row:
    def num(col):
        v = rec.get(col) if col else None
        return float(v) if v not in (None, "") else None

    return Row(index=index, url=_str(rec.get(url_col)), caption=rec.get(caption_col) if caption_col else None,
               extra={c: _jsonable(rec.get(c)) for c in opts.extra_cols},
               start_s=num(opts.start_col), end_s=num(opts.end_col))


def _check_columns(names: list[str], opts: SourceOptions, url_col: str, caption_col: str | None) -> None:
    wanted = [url_col] + ([caption_col] if caption_col else []) + list(opts.extra_cols)
    wanted += [c for c in (opts.start_col, opts.end_col) if c]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(f"--input {opts.input!r}: no column {missing[0]!r} (columns: {', '.join(names)})")


def _columns(opts: SourceOptions, fmt: str) -> tuple[str, str | None]:
    if fmt == "webvid" and opts.url_col == "url" and opts.caption_col == "caption":
        return "contentUrl", "name"  # WebVid's own column names unless the user mapped others
    return opts.url_col, opts.caption_col


def _parquet(opts: SourceOptions, fmt: str, ranges: RowRanges | None = None) -> Iterator[Row]:
    import pyarrow.parquet as pq

    url_col, caption_col = _columns(opts, fmt)
    with fsspec.open(opts.input, "rb") as f:
        pf = pq.ParquetFile(f)
        _check_columns(pf.schema_arrow.names, opts, url_col, caption_col)
        cols = list(dict.fromkeys(c for c in (url_col, caption_col, *opts.extra_cols, opts.start_col,
                                               opts.end_col) if c))
        if ranges is None:
            index = 0
            for batch in pf.iter_batches(batch_size=8192, columns=cols):
                for rec in batch.to_pylist():
                    yield _table_row(index, rec, opts, url_col, caption_col)
                    index += 1
            return
        first = 0
        for group in range(pf.num_row_groups):
            count = pf.metadata.row_group(group).num_rows
            wanted = ranges(first, first + count)
            if wanted:  # a group nobody here wants is never read
                table = pf.read_row_group(group, columns=cols)
                for a, b in wanted:  # only the wanted rows become Python objects
                    for offset, rec in enumerate(table.slice(a - first, b - a).to_pylist()):
                        yield _table_row(a + offset, rec, opts, url_col, caption_col)
            first += count


def _csv(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    url_col, caption_col = _columns(opts, fmt)
    parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
    read = pacsv.ReadOptions(block_size=1 << 20)
    with fsspec.open(opts.input, "rb", compression="infer") as f:
        names = pacsv.open_csv(f, read_options=read, parse_options=parse).schema.names
    _check_columns(names, opts, url_col, caption_col)
    # every column as binary: a caption that is not valid UTF-8 must reject its row, not stop the whole file
    convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names})
    with fsspec.open(opts.input, "rb", compression="infer") as f:
        index = 0
        for batch in pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert):
            for rec in batch.to_pylist():
                rec = {k: (v if k == caption_col else _decode_lenient(v)) for k, v in rec.items()}
                yield _table_row(index, rec, opts, url_col, caption_col)
                index += 1


def _jsonl(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    url_col, caption_col = _columns(opts, fmt)
    with fsspec.open(opts.input, "rb", compression="infer") as f:
        first = f.read(1)
        f.seek(0)
        if first == b"[":
            # a single JSON array cannot be streamed line by line; documented in --help as loaded whole
            records = json.load(f)
        else:
            records = (json.loads(line) for line in f if line.strip())
        for index, rec in enumerate(records):
            if index == 0:
                _check_columns(list(rec), opts, url_col, caption_col)
            yield _table_row(index, rec, opts, url_col, caption_col)


def _txt(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    with fsspec.open(opts.input, "rt", compression="infer", encoding="utf-8", errors="replace") as f:
        index = 0
        for line in f:
            if line.strip():
                yield Row(index=index, url=line.strip())
                index += 1


def _folder(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    fs, root = fsspec.core.url_to_fs(opts.input)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    media = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    paths = sorted(p for p in fs.find(root) if p.lower().endswith(media))
    if not paths:
        raise ValueError(f"--input {opts.input!r}: no image or video files in this folder (a named dataset needs "
                         "--input-format, e.g. fashion-mnist)")
    for index, path in enumerate(paths):
        sidecar = path.rsplit(".", 1)[0] + ".txt"
        caption = fs.cat_file(sidecar) if fs.exists(sidecar) else None
        url = path if protocol == "file" else f"{protocol}://{path}"
        yield Row(index=index, url=url, caption=caption, extra={"path": path[len(root):].lstrip("/")})


def _yfcc(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    with fsspec.open(opts.input, "rb", compression="infer") as f:
        for index, raw in enumerate(f):
            cols = raw.rstrip(b"\r\n").split(b"\t")
            shift = 0 if len(cols) >= _YFCC_COLUMNS else -2  # the original 23-column release lacks two
            if len(cols) < _YFCC_COLUMNS - 2:
                yield Row(index=index, skip_reason=f"yfcc row has {len(cols)} columns, expected 25")
                continue
            text = [urllib.parse.unquote_plus(c.decode("utf-8", "replace")) for c in cols]
            parts = {"title": text[8 + shift], "description": text[9 + shift],
                     "tags": text[10 + shift].replace(",", ", ")}
            caption = ". ".join(parts[p] for p in opts.yfcc_caption if parts[p].strip())
            row = Row(index=index, url=text[16 + shift], caption=caption,
                      extra={"photo_id": text[1 + shift], "license": text[17 + shift]})
            if text[24 + shift].strip() == "1":
                row.skip_reason = "yfcc row is a video (marker 1)"
            yield row


def _fashion_mnist(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    fs, root = fsspec.core.url_to_fs(opts.input)
    prefix = f"{root.rstrip('/')}/{_FMNIST_FILES[opts.split]}"
    images, labels = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
    for p in (images, labels):
        if not fs.exists(p):
            raise FileNotFoundError(f"--input {opts.input!r}: missing {p.rsplit('/', 1)[-1]} for split "
                                    f"{opts.split!r}")
    with fs.open(images, "rb") as fi, fs.open(labels, "rb") as fl, \
            gzip.GzipFile(fileobj=fi) as gi, gzip.GzipFile(fileobj=fl) as gl:
        magic, count, height, width = struct.unpack(">IIII", gi.read(16))
        lmagic, lcount = struct.unpack(">II", gl.read(8))
        if magic != 2051 or lmagic != 2049 or count != lcount:
            raise ValueError(f"--input {opts.input!r}: not a fashion-mnist idx pair (magic {magic}/{lmagic}, "
                             f"counts {count}/{lcount})")
        stride = height * width
        for index in range(count):
            pixels = gi.read(stride)
            label = gl.read(1)[0]
            yield Row(index=index, caption=fashion_mnist_caption(index, label),
                      extra={"cls": label, "label": FASHION_MNIST_CLASSES[label]},
                      pixels=("L", (width, height), pixels))


def _str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return str(v).strip() or None


def _decode_lenient(v: Any) -> Any:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if v is None or isinstance(v, (str, int, float, bool, list, dict)):
        return v
    return str(v)

