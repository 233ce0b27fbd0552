"""Read the samples of a WebDataset tar as raw bytes, without decoding anything and without tarfile.

Scoring and filtering read shards that come from anywhere (plait's own, img2dataset's, any WebDataset folder), so
nothing here interprets a member beyond its name: no pickle (webdataset's default decoders unpickle `.pyd` /
`.pth` members), no extraction to disk, no links followed. A sample is the run of consecutive regular members whose
names share the key (the name up to the first dot of its last path component, as webdataset groups them).

A header walk instead of `tarfile`: tarfile builds a TarInfo per member with several copies (tens of microseconds),
which is most of the time of copying small members; here a member costs one 512-byte read and one payload read, or
a seek over the payload when the caller does not want it (`want`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from data_prep.shards.members import split_name

_BLOCK = 512


class TarFormatError(ValueError):
    """The bytes are not a tar (or are truncated): the shard's remaining samples are unreadable."""


@dataclass
class RawSample:
    key: str
    members: list[tuple[str, bytes | None]]
    """(extension, payload) in tar order; payload None for members the reader was told to skip."""
    sizes: list[int]
    """Payload sizes of the members, also of skipped ones."""


def _octal(field: bytes, name: str) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
    try:
        return int(field or b"0", 8)
    except ValueError:
        raise TarFormatError(f"bad tar header ({name} field {field[:12]!r})") from None


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].rstrip(b"\0 ").lstrip(b" ")
    try:
        want = int(stored or b"-1", 8)
    except ValueError:
        return False
    return want == sum(header[:148]) + 8 * 32 + sum(header[156:])


def pax_path(payload: bytes) -> str | None:
    """The `path` record of a pax extended header (the long name of the member after it), if any."""
    for record in payload.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[len("path="):]
    return None


def iter_members(f: BinaryIO, want: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, bytes | None, int]]:
    """(name, payload or None, size) of every regular file member, in order. Raises TarFormatError on a bad
    header or a truncated payload."""
    pending_name: str | None = None
    while True:
        header = f.read(_BLOCK)
        if not header or header == bytes(_BLOCK):
            return
        if len(header) < _BLOCK:
            raise TarFormatError(f"truncated tar header ({len(header)} bytes)")
        if not _checksum_ok(header):
            raise TarFormatError("tar header checksum mismatch (not a tar, or corrupt)")
        size, kind = _octal(header[124:136], "size"), header[156:157]
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in (b"L", b"x"):  # GNU long name / pax header: the next member's real name
            payload = f.read(padded)
            if len(payload) < padded:
                raise TarFormatError("truncated tar (long name)")
            payload = payload[:size]
            pending_name = payload.rstrip(b"\0").decode("utf-8", "replace") if kind == b"L" else pax_path(payload)
            continue
        name = pending_name or header[0:100].rstrip(b"\0").decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0") and not pending_name:
            name = header[345:500].rstrip(b"\0").decode("utf-8", "replace") + "/" + name
        pending_name = None
        if kind not in (b"0", b"\0"):  # directories, links, devices: never part of a sample
            _skip(f, padded)
            continue
        if want(name):
            payload = f.read(padded)
            if len(payload) < padded:
                raise TarFormatError(f"truncated tar (member {name!r})")
            yield name, payload[:size], size
        else:
            _skip(f, padded)
            yield name, None, size


def _skip(f: BinaryIO, n: int) -> None:
    if not n:
        return
    try:
        f.seek(n, 1)
    except (OSError, ValueError):  # a stream without seeking
        while n:
            got = f.read(min(n, 1 << 20))
            if not got:
                raise TarFormatError("truncated tar") from None
            n -= len(got)


def iter_samples(f: BinaryIO, want: Callable[[str], bool] = lambda ext: True) -> Iterator[RawSample]:
    """Samples in tar order; `want(ext)` says which members' payloads to read (others are seeked over).
    Members that belong to no sample (members.split_name) are skipped."""
    current: RawSample | None = None
    for name, payload, size in iter_members(f, lambda n: (s := split_name(n)) is not None and want(s[1])):
        parts = split_name(name)
        if parts is None:
            continue
        key, ext = parts
        if current is not None and key != current.key:
            yield current
            current = None
        if current is None:
            current = RawSample(key, [], [])
        current.members.append((ext, payload))
        current.sizes.append(size)
    if current is not None:
        yield current
