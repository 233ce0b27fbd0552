"""Read samples [start, stop) of a tar shard without decoding, or even reading, the samples before `start`.

Positioning costs O(1) with plait's member index (`S.idx.json`, written by data_prep/shards/writer.py: byte offset of
each sample's first tar header) and otherwise O(members before start) 512-byte header reads plus seeks over the
payloads (img2dataset and other tars without an index). The samples themselves come from the format's own tar
walk (`tarwalk.iter_samples`, grouped by `members.split_name`), started at that byte offset: the same grouping
rules as `prep verify`, `prep index`, scoring and filtering, and no torch on this path (webdataset imports it).

Files are opened with fsspec rather than webdataset's `gopen` because gopen streams http through a `curl` pipe
(no seeking) and knows no s3/gs; fsspec files are seekable on every backend (ranged requests for http and
object stores). And gopen runs the shell command of a `pipe:` URL: here a `pipe:` URL opens only for a caller
that passes `allow_pipe=True` (the user's explicit `--allow-pipe`); a shard spec from elsewhere never runs code.
"""
from __future__ import annotations

import itertools
import json
import logging
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import fsspec
from data_prep.shards import layout, remote
from data_prep.shards.cache import ShardCache
from data_prep.shards.members import split_name
from data_prep.shards.tarwalk import TarWalk, iter_samples

log = logging.getLogger("plait.data")



@dataclass(frozen=True)
class Bad:
    """Stands in the stream for a sample that could not be read or decoded; `kind` is the counter's name."""

    kind: str
    detail: str


PIPE_PREFIX = "pipe:"


class PipeRefused(ValueError):
    """A `pipe:` shard URL (a shell command) met without the user's explicit permission."""


def check_no_pipe(url: str, allow_pipe: bool = False, flag: str = "") -> None:
    """Raises PipeRefused for a `pipe:` URL unless `allow_pipe`; `flag` names the switch that allows it."""
    if url.startswith(PIPE_PREFIX) and not allow_pipe:
        how = f"; pass {flag} if you wrote this command yourself" if flag else ""
        raise PipeRefused(f"shard {url!r} is a pipe: URL, which runs a shell command: refused{how}")


class _PipeReader:
    """stdout of the user's own `pipe:` command, as a forward-only binary file; closing it ends the command."""

    def __init__(self, command: str):
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)  # noqa: S602 (allowed by user)
        self.read = self.proc.stdout.read

    def close(self) -> None:
        self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_url(url: str, streaming: bool = False, allow_pipe: bool = False):
    """`url` opened for reading through fsspec; a `pipe:` URL only with `allow_pipe` (then forward-only)."""
    if url.startswith(PIPE_PREFIX):
        check_no_pipe(url, allow_pipe)
        return ForwardReader(_PipeReader(url[len(PIPE_PREFIX):]))
    fs, path = fsspec.core.url_to_fs(url)
    # block_size=0: fsspec's plain streaming read for http servers without range requests
    return fs.open(path, "rb", block_size=0) if streaming else fs.open(path, "rb")


class ForwardReader:
    """A forward-only stream made seekable forwards (by reading and discarding) and a little backwards (from
    the last bytes read): enough for positioning in a tar served without range requests. O(position) bytes
    read then, but still nothing decoded."""

    _KEEP = 1 << 16

    def __init__(self, f):
        self.f, self.pos, self.history, self.pending = f, 0, b"", b""

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        head, self.pending = (self.pending[:n], self.pending[n:]) if n >= 0 else (self.pending, b"")
        rest = self.f.read(n - len(head) if n >= 0 else -1) if n < 0 or len(head) < n else b""
        data = head + rest
        self.pos += len(data)
        self.history = (self.history + data)[-self._KEEP:]
        return data

    def seek(self, target: int, whence: int = 0) -> int:
        assert whence == 0
        if target < self.pos:
            back = self.pos - target
            if back > len(self.history):
                raise OSError(f"cannot seek back {back} bytes in a stream")
            self.pending = self.history[-back:] + self.pending
            self.history = self.history[:-back]
            self.pos = target
        while self.pos < target:
            if not self.read(min(target - self.pos, 1 << 20)):
                break
        return self.pos

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_at(url: str, start: int, use_index: bool = True):
    """`url` opened and positioned at the first header of sample `start` (by its index's offset unless
    `use_index` is False, else by walking the tar headers)."""
    offsets = sample_offsets(url) if start and use_index else None
    f = open_url(url)
    try:
        if offsets is not None and start < len(offsets):
            f.seek(offsets[start])
        elif start:
            seek_by_headers(f, start)
        if start:  # fsspec's http file seeks lazily; a server without range requests fails on the read
            pos = f.tell()
            f.read(1)
            f.seek(pos)
        return f
    except (ValueError, OSError) as exn:  # no random access (http without range requests)
        if isinstance(exn, EOFError):
            raise
        f.close()
    f = ForwardReader(open_url(url, streaming=True))
    if offsets is not None and start < len(offsets):
        f.seek(offsets[start])
    else:
        seek_by_headers(f, start)
    return f


def sample_offsets(url: str) -> tuple[int, ...] | None:
    """Byte offsets of the samples of `url` from its plait index `S.idx.json`, or None when there is none."""
    index = sample_index(url)
    return None if index is None else index[0]


@lru_cache(maxsize=64)
def sample_index(url: str) -> tuple[tuple[int, ...], tuple[str, ...] | None] | None:
    """(byte offsets, keys) of the samples of `url` from its plait index `S.idx.json` (keys None in an index
    without them), or None when there is none or it is damaged."""
    if not url.endswith(layout.TAR_SUFFIX):
        return None
    where = layout.sibling(url, layout.INDEX_SUFFIX)
    try:
        with open_url(where) as f:
            raw = f.read()
    except (FileNotFoundError, OSError):
        return None
    try:
        index = json.loads(raw)
        if not isinstance(index, dict) or index.get("format") != layout.INDEX_FORMAT:
            return None
        offsets = tuple(index["offsets"])
        if not all(type(o) is int for o in offsets) or any(b <= a for a, b in zip(offsets, offsets[1:])) or (
                offsets and offsets[0] < 0):
            raise ValueError("offsets are not increasing byte positions")
        keys = tuple(index["keys"]) if "keys" in index else None
        if keys is not None and (len(keys) != len(offsets) or not all(isinstance(k, str) for k in keys)):
            raise ValueError("keys do not pair with the offsets")
    except (ValueError, KeyError, TypeError) as exn:
        # The index only saves reading tar headers: without it the samples are found by walking them.
        log.warning("ignoring the damaged index %s (%s: %s); positioning by tar headers", where,
                    type(exn).__name__, exn)
        return None
    return offsets, keys


def seek_by_headers(f, sample: int) -> None:
    """Positions `f` at the first header of sample number `sample`, reading only the tar headers (the format's
    one walk, TarWalk). Samples are counted as `tarwalk.iter_samples` groups them: a new sample starts where
    the key (`members.split_name`) changes. EOFError when the tar holds fewer samples."""
    base, seen, current = f.tell(), -1, None
    for member in TarWalk(f, want=lambda name: False):
        parts = split_name(member.name) if member.is_file else None
        if parts is None or parts[0] == current:
            continue
        seen, current = seen + 1, parts[0]
        if seen == sample:
            f.seek(base + member.offset)
            return
    raise EOFError(f"tar ends after {seen + 1} samples, before sample {sample}")


def read_piece(url: str, start: int, stop: int, cache: ShardCache | None = None) -> Iterator[dict | Bad]:
    """Samples [start, stop) of shard `url` as webdataset sample dicts (`__key__`, `__url__`, `jpg`: bytes...),
    from `cache`'s local copy of a remote shard when a cache is given.

    Never raises for bad data: an unreadable shard, or one holding fewer samples than its count promised,
    yields one Bad per missing sample, so a slot's sample count (and hence every rank's batch count) holds."""
    count = stop - start
    if count <= 0:
        return
    got = 0
    try:
        source = cache.local(url) if cache is not None else url  # what is opened; samples keep `url`
        f = _open_at(source, start)
        try:
            stream = samples(f, url)
            first = next(stream, None)
            index = sample_index(source) if start else None
            expected = index[1][start] if index and index[1] and start < len(index[1]) else None
            if first is not None and expected is not None and first["__key__"] != expected:
                # The offset led to another sample than the index names: a stale or tampered index. Reading
                # on would shift the piece (one sample never read, another read twice): walk the headers.
                log.warning("%s: the index's offset of sample %d holds sample %r, not %r (a stale or altered "
                            "index): positioning by tar headers", url, start, first["__key__"], expected)
                f.close()
                f = _open_at(source, start, use_index=False)
                stream = samples(f, url)
                first = next(stream, None)
            for sample in itertools.chain(() if first is None else (first,), stream):
                yield sample
                got += 1
                if got == count:
                    return
        finally:
            f.close()
        reason = Bad("short_shard", f"{url}: {got} of {count} samples from {start} present")
    except Exception as exn:  # truncated tar, network error, bad header: the rest of the piece is lost
        exn = remote.refused_in(exn) or exn  # fsspec reports a refused redirect as FileNotFoundError
        reason = Bad("unreadable_shard", f"{url} at sample {start + got}: {type(exn).__name__}: {exn}")
    for _ in range(count - got):
        yield reason


def samples(f, url: str) -> Iterator[dict]:
    """webdataset-style sample dicts (`__key__`, `__url__`, one bytes value per extension) of the tar stream `f`
    from its current position. ValueError for a sample with two members of one extension (webdataset raises
    on it too), TarFormatError for a corrupt or truncated tar."""
    for raw in iter_samples(f):
        sample = {"__key__": raw.key, "__url__": url}
        for ext, payload in raw.members:
            if ext in sample:
                raise ValueError(f"{url}: sample {raw.key} has two .{ext} members")
            sample[ext] = payload
        yield sample


def read_shard(url: str, allow_pipe: bool = False) -> Iterator[dict]:
    """Every sample of shard `url` in order, as raw webdataset sample dicts (members as bytes: nothing is
    decoded here, see transforms.decode_fields); raises on a corrupt or unreadable shard after the samples
    before the damage."""
    with open_url(url, streaming=True, allow_pipe=allow_pipe) as f:
        yield from samples(f, url)
