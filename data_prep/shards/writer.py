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

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO

from data_prep.shards import manifest
from data_prep.shards import layout
from data_prep.shards.manifest import reason_kind
from data_prep.shards.outdir import OutputDir

__all__ = ["HashingWriter", "OutputDir", "Sample", "reason_kind", "shard_name", "tar_header", "write_shard"]


@dataclass
class Sample:
    key: str
    members: list[tuple[str, bytes]]
    """(extension, payload) in the order they go into the tar: media first, then txt, json, cls."""


class HashingWriter:
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


shard_name = layout.shard_name


def write_shard(out: OutputDir, shard_id: int, samples: list[Sample], records: list[dict[str, Any]],
                num_input_rows: int) -> dict[str, Any]:
    """Writes the four files of one shard; returns its stats (also the content of S_stats.json)."""
    samples = sorted(samples, key=lambda s: s.key)
    offsets = []
    with out.open_atomic(layout.tar_name(shard_id)) as raw:
        hw = HashingWriter(raw)
        for sample in samples:
            offsets.append(hw.size)
            for ext, payload in sample.members:
                hw.write(tar_header(f"{sample.key}.{ext}", len(payload)))
                hw.write(payload)
                if len(payload) % 512:
                    hw.write(bytes(512 - len(payload) % 512))
        hw.write(bytes(END_OF_ARCHIVE))
    out.write_json(layout.index_name(shard_id), {"format": layout.INDEX_FORMAT, "keys": [s.key for s in samples],
                                                  "offsets": offsets, "tar_bytes": hw.size})
    manifest.write_shard_records(out, layout.records_name(shard_id), records)
    reasons = Counter(reason_kind(r["reason"]) for r in records if r["status"] != "ok")
    num_ok = sum(1 for r in records if r["status"] == "ok")
    stats = {"format": layout.STATS_FORMAT, "shard": shard_id, "tar": layout.tar_name(shard_id),
             "num_input_rows": num_input_rows, "num_samples": len(samples), "num_ok": num_ok, "num_rejected": num_input_rows - num_ok,
             "reasons": dict(sorted(reasons.items())), "bytes": hw.size, "sha256": hw.sha.hexdigest()}
    assert sum(r["num_samples"] for r in records if r["status"] == "ok") == len(samples), "manifest and tar disagree"
    out.write_json(layout.stats_name(shard_id), stats)
    return stats
