"""Which local files an input may name, and what identifies an input between runs.

A table is untrusted: a local path in it (no scheme, or file://) is opened only under the table's own folder or
the folders named with --local-root, after symlinks and `..` are resolved (`resolve_local`), so a row cannot pull
`/etc/...`, `../secret` or a link out of its folder into a shard. A table that is not local (s3://, http) has no
default folder. Remote URLs are `fetch`'s business (its scheme allow-list); this module only decides local paths.

`input_fingerprint` is what a resume or an array task must find unchanged (with the input's path).
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import fsspec

from data_prep.input.formats import IMAGE_SUFFIXES, VIDEO_SUFFIXES, detect_format
from data_prep.options import SourceOptions
from data_prep.media.images import Reject
from data_prep.shards import remote


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_access(opts: SourceOptions, fmt: str | None = None) -> tuple[tuple[str, ...], str | None]:
    """(allowed folders, folder that relative paths start from) for the local paths the input names.

    A table: the folders of --local-root, else the table's own folder; a table that is not local (s3://, http)
    gets no default, so its local paths are refused unless --local-root names a folder. A folder input: the
    folder itself plus --local-root. Relative paths start from a local table's folder, else the first root."""
    fmt = fmt or (opts.input_format if opts.input_format != "auto" else detect_format(opts.input))
    roots = [os.path.realpath(r) for r in opts.local_root]
    remote.trust(opts.input)  # a table the user typed may sit on a private host (data_prep/shards/remote.py)
    fs, path = fsspec.core.url_to_fs(opts.input)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    base = None
    if protocol in ("file", "local"):
        base = os.path.realpath(path if fmt == "folder" else os.path.dirname(path))
        if fmt == "folder" or not roots:
            roots.append(base)
    elif roots:
        base = roots[0]
    return tuple(roots), base


def resolve_local(url: str, roots: tuple[str, ...], base: str | None) -> str:
    """The real path behind a local `url` of the input, or Reject when it leaves the allowed folders (after
    symlinks and `..` are resolved, so a link inside a root cannot lead out of it)."""
    path = url[len("file://"):] if url.startswith("file://") else url
    if path.startswith("localhost/"):
        path = path[len("localhost"):]
    if not roots or base is None:
        raise Reject("local path in a table that is not local (pass --local-root DIR to allow a folder)")
    real = os.path.realpath(os.path.join(base, path))
    if not under(real, roots):
        raise Reject("local path outside the allowed folders (the table's folder, or --local-root)")
    return real


def under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def input_fingerprint(path: str) -> dict[str, Any]:
    """What tells one input from another under the same name: a file's size and modification time (or ETag),
    a folder's number of media files, bytes and newest modification time. A resume or an array task must see
    the same, else it would cut another input into the same dataset."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        info = fs.info(root)
        out = {"size": info.get("size")}
        for key in ("mtime", "LastModified", "last_modified", "ETag", "etag", "updated", "md5Hash"):
            if info.get(key) is not None:
                out[key.lower()] = info[key] if isinstance(info[key], (int, float)) else str(info[key])
        return out
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    media = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    count = size = 0
    newest = 0.0
    if protocol in ("file", "local"):
        for p in walk_local(root):
            if p.lower().endswith(media + (".txt",)):
                st = os.lstat(p)
                count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime)
    else:
        for p, info in fs.find(root, detail=True).items():
            if p.lower().endswith(media + (".txt",)):
                count, size = count + 1, size + (info.get("size") or 0)
    return {"files": count, "size": size, "mtime": newest}


def walk_local(root: str) -> Iterator[str]:
    """Files under `root`, without entering linked directories (a link to / or back to the folder itself)."""
    for folder, _, files in os.walk(root, followlinks=False):
        for name in files:
            yield os.path.join(folder, name)
