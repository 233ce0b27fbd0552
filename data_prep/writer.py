"""Atomic output: one shard = a tar, its member index, its per-sample manifest and its stats, in that order.

Every file goes to `NAME.tmp` first and is renamed when complete (object stores: uploaded whole, which is atomic
there), so a reader never sees a partial file, also after `kill -9`. The stats file is written last and is the
shard's "done" marker: resume skips exactly the shards that have one.

Files of shard S in the output folder (S formatted as `{S:05d}`):
  S.tar         samples in key order; per sample `{key}.jpg|png|webp` (video: `{key}.f0000.jpg`, ...),
                `{key}.txt` (caption), `{key}.json` (metadata), and `{key}.cls` (ascii int) when the json has `cls`.
                Tar headers are deterministic (mtime 0, uid/gid 0, mode 0444): a rerun gives identical bytes.
  S.idx.json    member index for O(1) resume inside a shard:
                {"format": "plait-tar-index/1", "keys": [k0, k1, ...], "offsets": [o0, o1, ...], "tar_bytes": N}
                where offsets[i] is the byte offset in S.tar of the 512-byte tar header of the FIRST member of
                sample keys[i]; seeking there and reading the tar stream yields sample i onwards.
  S.parquet     one row per input row of the shard (ok or rejected with its reason): see manifest.py.
  S_stats.json  counts, reject reasons, tar bytes and sha256 (the done marker).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass
class Sample:
    key: str
    members: list[tuple[str, bytes]]
    """(extension, payload) in the order they go into the tar: media first, then txt, json, cls."""


class OutputDir:
    """A folder on any fsspec filesystem with atomic writes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.glob(self.path(pattern)))

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name))

    @contextlib.contextmanager
    def open_atomic(self, name: str) -> Iterator[BinaryIO]:
        final = self.path(name)
        if "/" in name:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            tmp = final + ".tmp"
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            # object stores have no rename; a single upload of a complete local file is atomic there
            with tempfile.NamedTemporaryFile(suffix=".plait") as f:
                yield f
                f.flush()
                self.fs.put_file(f.name, final)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_atomic(name) as f:
            f.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n")


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.size


END_OF_ARCHIVE = 10240  # two zero blocks, padded to tar's 20-block record, as tarfile and GNU tar write


def tar_header(name: str, size: int) -> bytes:
    """A ustar header with fixed metadata (mode 0444, mtime 0, uid/gid 0).

    Written by hand because tarfile.addfile builds each header through generic TarInfo copies at ~100 us per
    member, which dominated small-image shards (4 members per sample)."""
    raw = name.encode()
    assert len(raw) <= 100, f"tar member name too long: {name!r}"
    header = bytearray(512)
    header[0:len(raw)] = raw
    header[100:108] = b"0000444\0"
    header[108:116] = header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def reason_kind(reason: str) -> str:
    """The fixed phrase of a reason, without its details: 'http 404' stays, 'image too small (3x3 < 8)' ->
    'image too small'."""
    return reason.split(" (", 1)[0].split(": ", 1)[0]


def write_shard(out: OutputDir, shard_id: int, samples: list[Sample], records: list[dict[str, Any]],
                num_input_rows: int) -> dict[str, Any]:
    """Writes the four files of one shard; returns its stats (also the content of S_stats.json)."""
    from data_prep import manifest  # manifest imports writer for OutputDir; import here avoids the cycle

    name = shard_name(shard_id)
    samples = sorted(samples, key=lambda s: s.key)
    offsets = []
    with out.open_atomic(f"{name}.tar") as raw:
        hw = _HashingWriter(raw)
        for sample in samples:
            offsets.append(hw.size)
            for ext, payload in sample.members:
                hw.write(tar_header(f"{sample.key}.{ext}", len(payload)))
                hw.write(payload)
                if len(payload) % 512:
                    hw.write(bytes(512 - len(payload) % 512))
        hw.write(bytes(END_OF_ARCHIVE))
    out.write_json(f"{name}.idx.json", {"format": "plait-tar-index/1", "keys": [s.key for s in samples],
                                         "offsets": offsets, "tar_bytes": hw.size})
    manifest.write_shard_records(out, f"{name}.parquet", records)
    reasons = Counter(reason_kind(r["reason"]) for r in records if r["status"] != "ok")
    num_ok = sum(1 for r in records if r["status"] == "ok")
    stats = {"format": "plait-shard/1", "shard": shard_id, "tar": f"{name}.tar", "num_input_rows": num_input_rows,
             "num_samples": len(samples), "num_ok": num_ok, "num_rejected": num_input_rows - num_ok,
             "reasons": dict(sorted(reasons.items())), "bytes": hw.size, "sha256": hw.sha.hexdigest()}
    assert sum(r["num_samples"] for r in records if r["status"] == "ok") == len(samples), "manifest and tar disagree"
    out.write_json(f"{name}_stats.json", stats)
    return stats
