"""One work unit: (shard id, rows) -> a finished shard. Runs in a worker process; everything it needs is picklable.

Stages per row, in order: reader's own verdict (e.g. a YFCC video row), caption cleanup, fetch (threaded for
remote URLs, in input order), sha256 + exact dedup (within the shard here; across shards in `merge`; against an
earlier dataset's manifest if asked), decode/resize/encode (images) or frame sampling (video), sample assembly.

What dedup compares is the record's `sha256`: the sha256 of the fetched bytes, or for a segment of a video (a
row with a start or an end) `segment_digest` of those bytes' sha256 and the segment's times, so that two windows
of one file are two samples and the same window of two identical files is one.
Each stage may raise `Reject`; the reason becomes the row's manifest record, so nothing is lost or crashes.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

from data_prep.shards import manifest
from data_prep.input.access import is_local, local_access, resolve_local
from data_prep.fetch.fetcher import Fetcher, redact
from data_prep.input.labels import label_id
from data_prep.shards.layout import text_members
from data_prep.options import JobOptions
from data_prep.job.plan import sample_key
from data_prep.media.images import Reject, clean_caption, process_image
from data_prep.media.video import LocalVideo
from data_prep.input.sources import Row
from data_prep.shards.writer import OutputDir, Sample, write_shard

_progress = None  # multiprocessing.Value('q') of processed rows, set by the pool initializer
_earlier_hashes: dict[str, frozenset[str]] = {}
_file_hashes: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256, the videos lately seen
_FILE_HASHES_KEPT = 64


def init_worker(progress) -> None:
    global _progress
    _progress = progress


def _tick(n: int = 1) -> None:
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += n


def earlier_hashes(path: str | None) -> frozenset[str]:
    """sha256 of the ok samples of an earlier dataset (its samples.parquet), loaded once per process."""
    if not path:
        return frozenset()
    if path not in _earlier_hashes:
        import fsspec
        if not fsspec.core.url_to_fs(path)[0].exists(fsspec.core.url_to_fs(path)[1]):
            raise FileNotFoundError(f"--dedup-against {path!r}: no such manifest")
        with fsspec.open(path, "rb") as f:
            t = manifest.read_parquet(f, ["status", "sha256"])
        _earlier_hashes[path] = frozenset(h for s, h in zip(t.column("status").to_pylist(),
                                                            t.column("sha256").to_pylist()) if s == "ok" and h)
    return _earlier_hashes[path]


def file_sha256(path: str) -> str:
    """sha256 of a local file, read in 1 MiB blocks (a long video is never held whole), once per process for
    the segments of one video."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        if len(_file_hashes) >= _FILE_HASHES_KEPT:
            _file_hashes.pop(next(iter(_file_hashes)))
        _file_hashes[key] = h.hexdigest()
    return _file_hashes[key]


def segment_digest(content_sha256: str, start_s: float | None, end_s: float | None) -> str:
    """What dedup compares for a row: the bytes' sha256 for a whole file; for a segment, the sha256 of the bytes'
    sha256 and its [start, end] (repr of the floats: the same times in any run)."""
    if start_s is None and end_s is None:
        return content_sha256
    return hashlib.sha256(f"{content_sha256}:{start_s!r}:{end_s!r}".encode()).hexdigest()


def build_shard(opts: JobOptions, shard_id: int, rows: list[Row]) -> dict[str, Any]:
    """One shard from start to end, its rows fetched in input order (the pilot's path; jobs use `pool`)."""
    build = ShardBuild(opts, shard_id, rows)
    fetcher = Fetcher(opts.fetch)
    fetched = (build.read_local(fetcher, url) if build.streams(url) else data
               for (_, url), data in zip(build.to_fetch, fetcher.fetch_many(
                   None if build.streams(url) else url for _, url in build.to_fetch)))
    for (row, _), data in zip(build.to_fetch, fetched):
        build.add(row, data)
    return build.finish()


class ShardBuild:
    """One shard under construction: rows are admitted up front, their fetched media added in any order (as
    fetches complete), and `finish` writes the samples in row order. Duplicates are settled by row index (the
    first row with given bytes is kept), so the shard is the same whatever order fetches complete in."""

    def __init__(self, opts: JobOptions, shard_id: int, rows: list[Row]) -> None:
        self.opts, self.shard_id, self.num_rows = opts, shard_id, len(rows)
        self.earlier = earlier_hashes(opts.dedup_against)
        caption_required = opts.source.caption_col is not None and opts.source.input_format != "txt"
        roots, base = local_access(opts.source)
        label_index = {name: i for i, name in enumerate(opts.class_names)} if opts.class_names else None
        self.records: list[dict[str, Any]] = []
        self.captions: dict[int, str] = {}
        self.to_fetch: list[tuple[Row, str | None]] = []
        """(row, url to fetch) for rows that passed admission; url None for inline media."""
        for row in rows:
            rec = manifest.record(sample_key(row.index), row.index, shard_id, redact(row.url))
            if row.start_s is not None or row.end_s is not None:  # a segment: its times even when it is rejected
                rec.update(video_id=row.extra.get("video_id"), segment_index=row.extra.get("segment_index"),
                           start=row.start_s, end=row.end_s)
            self.records.append(rec)
            try:
                if row.skip_reason:
                    raise Reject(row.skip_reason)
                if row.pixels is None and not row.url:
                    raise Reject("missing url")
                self.captions[row.index] = clean_caption(row.caption, opts.image, required=caption_required)
                if opts.source.label_col:
                    cls, name = label_id(row.label, opts.class_names, label_index)
                    row.extra = {**row.extra, "cls": cls, **({"label": name} if name is not None else {})}
                # a local path from the input is read only under the allowed folders, through its real path
                url = None if row.pixels is not None else \
                    resolve_local(row.url, roots, base) if is_local(row.url) else row.url
                self.to_fetch.append((row, url))
            except Reject as r:
                _reject(rec, r)
                _tick()
        self.by_row = {rec["row"]: rec for rec in self.records}
        self.samples: dict[int, list[Sample]] = {}
        self.kept: dict[str, int] = {}  # sha256 -> row kept so far (the lowest row index with those bytes)
        self.duplicates: dict[int, str] = {}  # row -> sha256 of a kept row's bytes
        self.before: dict[int, dict[str, Any]] = {}  # kept row -> its record before processing (for demotion)

    def streams(self, url: str | None) -> bool:
        """A local video file is decoded from its path by seeking (`LocalVideo`), never read whole."""
        return bool(self.opts.video.video and url and is_local(url))

    def read_local(self, fetcher: Fetcher, url: str | None) -> bytes | LocalVideo | Reject | None:
        """The media of a row that is not fetched over the network (url already resolved by the access rules)."""
        if not self.streams(url):
            return fetcher.fetch_or_reject(url)
        if not os.path.exists(url):
            return Reject("file not found")
        if not os.path.isfile(url):
            return Reject("unreadable file: not a regular file")
        return LocalVideo(url)

    def add(self, row: Row, data: bytes | LocalVideo | Reject | None) -> None:
        """Processes one admitted row's fetched media (a Reject: the fetch failed); never raises for the row."""
        rec = self.by_row[row.index]
        try:
            if isinstance(data, Reject):
                raise data
            if isinstance(data, LocalVideo):
                content = file_sha256(data.path)
            else:
                content = hashlib.sha256(data if row.pixels is None else row.pixels[2]).hexdigest()
            sha = segment_digest(content, row.start_s, row.end_s)
            rec["sha256"] = sha
            kept = self.kept.get(sha)
            if self.opts.dedup and kept is not None and kept < row.index:
                self.duplicates[row.index] = sha
                raise Reject("duplicate")  # reason settled in finish, once the kept row is final
            if sha in self.earlier:
                raise Reject("duplicate of an earlier dataset")
            before = dict(rec)
            self.samples[row.index] = _make_samples(self.opts, row, rec, data, self.captions[row.index], sha,
                                                    content)
            if kept is not None and self.opts.dedup:  # a later row with these bytes came first: it yields
                self._demote(kept, sha)
            if kept is None or row.index < kept:
                self.kept[sha] = row.index
            self.before[row.index] = before
        except Reject as r:
            _reject(rec, r)
        except Exception as e:  # a decoder failing in a way nobody listed must cost one row, not the shard
            _reject(rec, Reject(f"processing error ({type(e).__name__}: {str(e)[:160]})"))
        _tick()

    def _demote(self, row_index: int, sha: str) -> None:
        del self.samples[row_index]
        rec = self.by_row[row_index]
        rec.clear()
        rec.update(self.before.pop(row_index), sha256=sha)
        self.duplicates[row_index] = sha
        _reject(rec, Reject("duplicate"))

    def finish(self) -> dict[str, Any]:
        for row_index, sha in self.duplicates.items():
            self.by_row[row_index]["reason"] = f"duplicate (of {sample_key(self.kept[sha])})"
        samples = [s for i in sorted(self.samples) for s in self.samples[i]]
        return write_shard(OutputDir(self.opts.output), self.shard_id, samples, self.records, self.num_rows)


def _reject(rec: dict[str, Any], r: Reject) -> None:
    rec.update(status="rejected", reason=r.reason, transient=r.transient)


def _make_samples(opts: JobOptions, row: Row, rec: dict[str, Any], data: bytes | LocalVideo | None, caption: str,
                  sha: str, content_sha: str) -> list[Sample]:
    meta = {"key": rec["key"], "caption": caption, "url": rec["url"], "status": "success", "sha256": sha,
            **row.extra}
    if sha != content_sha:  # a segment: its digest above, the file's own sha256 here
        meta["video_sha256"] = content_sha
    if opts.video.video:
        from data_prep.media.video import video_samples
        return video_samples(opts, row, rec, data, caption, meta)
    enc = process_image(data, opts.image, pixels=row.pixels)
    rec.update(width=enc.width, height=enc.height, original_width=enc.original_width,
               original_height=enc.original_height, bytes=len(enc.data), num_samples=1)
    meta.update(width=enc.width, height=enc.height, original_width=enc.original_width,
                original_height=enc.original_height)
    return [Sample(rec["key"], [(enc.ext, enc.data), *text_members(caption, meta)])]

