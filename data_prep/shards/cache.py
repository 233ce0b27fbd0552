"""A node-local cache of remote shards (`data.cache_dir`, `data.cache_bytes`): the first read of an s3://, gs://
or http(s):// shard downloads it (with its `S.idx.json`), later epochs and resumed runs read the local copy.

Layout: `CACHE/<sha256 of the shard's folder URL, 32 hex>/<shard name>` beside its index, so the index is found
as the sibling it is remotely, plus `<shard name>.cached.json` recording the URL and size fetched. A copy is used
only while its size matches that record (a file cut short by a full disk is fetched again); the seek check of
`tarseek.read_piece` then compares each sample with the index as for any shard.

Shared by the workers and ranks of one node: a download holds an flock on its entry (the others wait for it,
then read the copy instead of fetching it again) and lands under a private temp name renamed into place.
Every use touches the copy's mtime; after each download the least recently used entries leave until the
cache is within its bound (never the entry just fetched; a reader holding a removed file keeps reading it).
Only files with the names above are ever deleted.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec

from data_prep.shards import layout

RECORD_SUFFIX = ".cached.json"


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


@contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class ShardCache:
    """Remote shards on local disk, at most `max_bytes` (picklable: each loader worker holds one)."""

    root: str
    max_bytes: int

    def entry(self, url: str) -> Path:
        folder, name = posixpath.split(url)
        if not name or name.startswith(".") or "\\" in name or "\0" in name:  # never a path out of the entry
            name = hashlib.sha256(name.encode()).hexdigest()[:32] + layout.TAR_SUFFIX
        return Path(self.root) / hashlib.sha256(folder.encode()).hexdigest()[:32] / name

    def local(self, url: str) -> str:
        """A local path holding shard `url` (fetched now if the cache has no good copy); `url` itself when it
        is local already."""
        if not is_remote(url):
            return url
        path = self.entry(url)
        if self._good(path, url):
            os.utime(path)
            return str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent / f".{path.name}.lock"):
            if not self._good(path, url):  # another worker or rank may have fetched it while this one waited
                self._fetch(url, path)
        self._evict(keep=path)
        return str(path)

    def _good(self, path: Path, url: str) -> bool:
        try:
            record = json.loads((path.parent / (path.name + RECORD_SUFFIX)).read_text())
            return record.get("url") == url and path.stat().st_size == record.get("size")
        except (OSError, ValueError, AttributeError):
            return False

    def _fetch(self, url: str, path: Path) -> None:
        fs, remote_path = fsspec.core.url_to_fs(url)
        tmp = path.parent / f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp"
        index_url = layout.sibling(url, layout.INDEX_SUFFIX)
        index = path.parent / posixpath.basename(index_url)
        try:
            fs.get_file(remote_path, str(tmp))
            size = tmp.stat().st_size
            try:
                expected = fs.size(remote_path)
            except (OSError, NotImplementedError):
                expected = None
            if expected is not None and size != expected:
                raise OSError(f"{url}: fetched {size} bytes for the cache, the server says {expected}")
            try:  # the index beside it, so that seeks by index work on the copy
                index_fs, index_path = fsspec.core.url_to_fs(index_url)
                index_fs.get_file(index_path, str(index.with_name(index.name + ".tmp")))
                os.replace(index.with_name(index.name + ".tmp"), index)
            except FileNotFoundError:
                index.unlink(missing_ok=True)
            os.replace(tmp, path)
            (path.parent / (path.name + RECORD_SUFFIX)).write_text(json.dumps({"url": url, "size": size}))
        finally:
            tmp.unlink(missing_ok=True)
            index.with_name(index.name + ".tmp").unlink(missing_ok=True)

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes with its index, shard copy) of every cached shard."""
        out = []
        for record in Path(self.root).glob(f"*/*{RECORD_SUFFIX}"):
            path = record.with_name(record.name[:-len(RECORD_SUFFIX)])
            index = path.with_name(posixpath.basename(layout.sibling(path.name, layout.INDEX_SUFFIX)))
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            out.append((stat.st_mtime, stat.st_size + (index.stat().st_size if index.exists() else 0), path))
        return sorted(out)

    def _evict(self, keep: Path) -> None:
        with _locked(Path(self.root) / ".evict.lock"):
            entries = self._entries()
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                if path == keep:
                    continue
                for victim in (path.parent / (path.name + RECORD_SUFFIX), path,
                               path.with_name(posixpath.basename(layout.sibling(path.name, layout.INDEX_SUFFIX)))):
                    victim.unlink(missing_ok=True)
                total -= size
