"""Input readers: every supported input format streamed as `Row`s, one per input row, in input order.

Readers never hold the whole input: parquet is read row group by row group, csv/tsv in blocks through pyarrow's
streaming reader (gzip handled by fsspec), jsonl and txt line by line, folders by a sorted walk. Peak memory
depends on the block size, not on the number of rows. `Row.index` is the position in the input, the only thing
keys and shards are derived from.

Every physical line of a line-based table is one row or a reject naming its line (blank lines hold no row): TSV
is unquoted (the YFCC100M and CC3M convention), so a caption that starts with `"` stays one caption; a CSV record
must sit on one line, so a quote left open rejects its line instead of swallowing the lines after it.

Local paths a table names are checked by `data_prep.input.access` (under the table's folder or --local-root only); a
folder input is walked without following directory links, and a sidecar caption that is a link out of the folder
rejects its row.

Named formats: `yfcc100m` (the tab-separated metadata dump), `webvid` (its CSV layout), `fashion-mnist` (idx gz
files with inline pixels; class names and caption templates exported as constants for the demo's zero-shot
evaluation, which should use other templates than the training ones).
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import os
import random
import struct
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import fsspec

from data_prep.input.access import under, walk_local
from data_prep.input.formats import IMAGE_SUFFIXES, VIDEO_SUFFIXES, detect_format  # noqa: F401 (re-exported)
from data_prep.options import SourceOptions

FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
"""Class names in label order (label i is FASHION_MNIST_CLASSES[i])."""

FASHION_MNIST_TEMPLATES = ("a photo of {}", "a product shot of {}", "an image of {}", "a picture of {}",
                           "a close-up photo of {}")
"""Training caption templates; `{}` takes the class name with its article (see `with_article`)."""

MAX_LINE_BYTES = 16 * 2**20
"""Longest line a line-based table may have; a longer one is a reject naming its line."""
MAX_CAPTION_FILE_BYTES = 2**20
"""Largest sidecar caption file read from a folder input."""
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
    label: Any = None
    """The --label-col value as read (an id or a class name; mapped by the worker)."""


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
    from data_prep.input import segments
    if segments.is_segmenting(opts):  # rows are videos, cut into one row per segment
        yield from segments.segment_rows(opts, read_rows(segments.video_columns(opts)))
        return
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
    from data_prep.input.segments import is_segmenting
    if fmt != "parquet" or is_segmenting(opts):  # segments per video are known once the videos are read
        return None
    import pyarrow.parquet as pq

    with _open_parquet(opts.input) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _open_parquet(url: str):
    """A local table as Arrow's own file, a remote one through fsspec.

    Arrow reads a Python file object on its I/O threads, calling back into Python; one still holding it while the
    interpreter finalizes aborts the process after the job finished ("terminate called without an active
    exception", apache/arrow#34314). A native file keeps Python out of Arrow's threads. Remote tables are streamed
    by row group, too large to read into memory first as records are (manifest.read_parquet)."""
    import pyarrow as pa
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(url)
    return pa.OSFile(path) if isinstance(fs, LocalFileSystem) else fsspec.open(url, "rb").open()


def _table_row(index: int, rec: dict[str, Any], opts: SourceOptions, url_col: str,
               caption_col: str | None) -> Row:
    row = Row(index=index, caption=rec.get(caption_col) if caption_col else None,
              extra={c: _jsonable(rec.get(c)) for c in opts.extra_cols},
              label=rec.get(opts.label_col) if opts.label_col else None)
    try:
        row.url = _url(rec.get(url_col))
        row.start_s, row.end_s = _seconds(opts.start_col, rec), _seconds(opts.end_col, rec)
    except ValueError as e:
        row.skip_reason = str(e)
    return row


def _url(v: Any) -> str | None:
    if v is None or isinstance(v, (str, bytes)):
        return _str(v)
    raise ValueError(f"url is not text ({type(v).__name__})")


def _seconds(col: str | None, rec: dict[str, Any]) -> float | None:
    v = rec.get(col) if col else None
    if v in (None, "", b""):
        return None
    try:
        seconds = float(v)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds):
        raise ValueError(f"{col} {v!r} is not a number of seconds")
    return seconds


def _check_columns(names: list[str], opts: SourceOptions, url_col: str, caption_col: str | None) -> None:
    wanted = [url_col] + ([caption_col] if caption_col else []) + list(opts.extra_cols)
    wanted += [c for c in (opts.start_col, opts.end_col, opts.label_col) if c]
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
    with _open_parquet(opts.input) as f:
        pf = pq.ParquetFile(f)
        _check_columns(pf.schema_arrow.names, opts, url_col, caption_col)
        cols = list(dict.fromkeys(c for c in (url_col, caption_col, *opts.extra_cols, opts.start_col,
                                               opts.end_col, opts.label_col) if c))
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
    """CSV (RFC 4180 quoting within a line) or TSV (no quoting at all), one record per physical line."""
    url_col, caption_col = _columns(opts, fmt)
    kind = "tsv" if fmt == "tsv" else "csv"
    with fsspec.open(opts.input, "rb", compression="infer") as f:
        lines = ((n, line) for n, line in _lines(f) if line is None or line.strip())  # blank lines hold no row
        first = next(lines, None)
        if first is None:
            return
        if first[1] is None:
            raise ValueError(f"--input {opts.input!r}: header line {first[0]} is longer than {MAX_LINE_BYTES} bytes")
        try:
            names = [v.decode("utf-8", "replace") for v in _fields(first[1].removeprefix(b"\xef\xbb\xbf"), kind)]
        except csv.Error as e:
            raise ValueError(f"--input {opts.input!r}: header line {first[0]}: {e}") from None
        _check_columns(names, opts, url_col, caption_col)
        for index, (number, line) in enumerate(lines):
            if line is None:
                yield Row(index=index, skip_reason=f"{kind} line {number}: longer than {MAX_LINE_BYTES} bytes")
                continue
            try:
                values = _fields(line, kind)
            except csv.Error as e:
                yield Row(index=index, skip_reason=f"{kind} line {number}: {e}")
                continue
            if len(values) != len(names):
                yield Row(index=index, skip_reason=f"{kind} line {number}: {len(values)} fields, expected "
                                                   f"{len(names)}")
                continue
            # a caption that is not valid UTF-8 stays bytes: it must reject its row, not stop the whole file
            rec = {k: (v if k == caption_col else v.decode("utf-8", "replace")) for k, v in zip(names, values)}
            yield _table_row(index, rec, opts, url_col, caption_col)


def _fields(line: bytes, kind: str) -> list[bytes]:
    if kind == "tsv":
        return line.split(b"\t")
    # a reader per line: one that saw the whole file would let an open quote take the following lines along
    text = line.decode("utf-8", "surrogateescape")
    fields = next(csv.reader([text], strict=True), [])
    return [v.encode("utf-8", "surrogateescape") for v in fields]


def _jsonl(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    url_col, caption_col = _columns(opts, fmt)
    with fsspec.open(opts.input, "rb", compression="infer") as f:
        first = f.read(1)
        f.seek(0)
        if first == b"[":
            # a single JSON array cannot be streamed line by line; documented in --help as loaded whole
            try:
                items = json.load(f)
            except ValueError as e:
                raise ValueError(f"--input {opts.input!r}: invalid JSON ({e})") from None
            records = ((f"json item {i + 1}", rec, None) for i, rec in enumerate(items))
        else:
            records = _json_lines(f)
        checked = False
        for index, (where, rec, error) in enumerate(records):
            if error is not None:
                yield Row(index=index, skip_reason=f"{where}: {error}")
            elif not isinstance(rec, dict):
                yield Row(index=index, skip_reason=f"{where}: not an object ({type(rec).__name__})")
            else:
                if not checked:
                    _check_columns(list(rec), opts, url_col, caption_col)
                    checked = True
                yield _table_row(index, rec, opts, url_col, caption_col)


def _json_lines(f) -> Iterator[tuple[str, Any, str | None]]:
    for number, line in _lines(f):
        if line is None:
            yield f"jsonl line {number}", None, f"longer than {MAX_LINE_BYTES} bytes"
            continue
        if not line.strip():
            continue
        try:
            yield f"jsonl line {number}", json.loads(line), None
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            yield f"jsonl line {number}", None, f"invalid JSON ({str(e)[:120]})"


def _txt(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    with fsspec.open(opts.input, "rb", compression="infer") as f:
        index = 0
        for number, line in _lines(f):
            if line is None:
                yield Row(index=index, skip_reason=f"txt line {number}: longer than {MAX_LINE_BYTES} bytes")
            elif line.strip():
                yield Row(index=index, url=line.decode("utf-8", "replace").strip())
            else:
                continue
            index += 1


def _lines(f) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line without its end) of a binary file; None for a line longer than MAX_LINE_BYTES, which
    is skipped to its end in bounded reads (a table that is one endless line must not fill the memory)."""
    number = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            yield number, None
            continue
        yield number, line.rstrip(b"\r\n")


def _folder(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    fs, root = fsspec.core.url_to_fs(opts.input)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    media = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    paths = sorted(p for p in (walk_local(root) if local else fs.find(root)) if p.lower().endswith(media))
    if not paths:
        raise ValueError(f"--input {opts.input!r}: no image or video files in this folder (a named dataset needs "
                         "--input-format, e.g. fashion-mnist)")
    real_root = os.path.realpath(root) if local else None
    for index, path in enumerate(paths):
        sidecar = path.rsplit(".", 1)[0] + ".txt"
        url = path if local else f"{protocol}://{path}"
        row = Row(index=index, url=url, extra={"path": path[len(root):].lstrip("/")})
        if local and os.path.lexists(sidecar) and not under(os.path.realpath(sidecar), (real_root,)):
            row.skip_reason = "caption file outside the input folder (a link)"
        elif fs.exists(sidecar):
            with fs.open(sidecar, "rb") as f:
                row.caption = f.read(MAX_CAPTION_FILE_BYTES + 1)
            if len(row.caption) > MAX_CAPTION_FILE_BYTES:
                row.caption, row.skip_reason = None, f"caption file larger than {MAX_CAPTION_FILE_BYTES} bytes"
        yield row


def _yfcc(opts: SourceOptions, fmt: str) -> Iterator[Row]:
    with fsspec.open(opts.input, "rb", compression="infer") as f:
        for index, (number, raw) in enumerate(_lines(f)):
            if raw is None:
                yield Row(index=index, skip_reason=f"yfcc line {number}: longer than {MAX_LINE_BYTES} bytes")
                continue
            cols = raw.split(b"\t")
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
    """A kept value as strict JSON: NaN and infinity (parquet floats, Python's json reading 'NaN') become null,
    else `{key}.json` would not parse in other readers."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (str, int, bool)):
        return v
    return str(v)
