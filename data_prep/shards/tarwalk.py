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


# What a member that is not a file is, for the messages of the readers that report one.
MEMBER_KINDS = {b"5": "a directory", b"2": "a symlink", b"1": "a hard link", b"3": "a character device",
                b"4": "a block device", b"6": "a fifo"}


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


@dataclass
class Member:
    name: str
    kind: bytes
    """The tar type flag: b"0" (or b"\\0") a regular file; b"5" a directory, b"2" a symlink, b"1" a hard link..."""
    offset: int
    """Of its first header block (its long-name or pax header where it has one): where a seek-by-index starts."""
    size: int
    payload: bytes | None
    """The bytes of a regular file the walker was told to read, else None."""

    @property
    def is_file(self) -> bool:
        return self.kind in (b"0", b"\0", b"7")  # 7: contiguous file, a regular file to every reader


class TarWalk:
    """Every member of a tar in order, files and not (directories, links, devices), with its offset.
    `want(name)` says which regular files' payloads to read; the others are seeked over (read past on a stream
    that cannot seek). After the iteration, `end` is the offset just past the last member's padded payload: a
    file shorter than `end` + 1024 lacks the end-of-archive blocks (a writer killed between two members).
    Raises TarFormatError on a bad header or a truncated payload."""

    def __init__(self, f: BinaryIO, want: Callable[[str], bool] = lambda name: True) -> None:
        self.f, self.want, self.end = f, want, 0

    def __iter__(self) -> Iterator[Member]:
        f, pos, pending_name, start = self.f, 0, None, None
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
            start = pos if start is None else start
            pos += _BLOCK
            if kind in (b"L", b"x", b"g"):  # GNU long name / pax header: the next member's real name
                payload = f.read(padded)
                if len(payload) < padded:
                    raise TarFormatError("truncated tar (long name)")
                pos += padded
                payload = payload[:size]
                if kind == b"L":
                    pending_name = payload.rstrip(b"\0").decode("utf-8", "replace")
                elif kind == b"x":
                    pending_name = pax_path(payload) or pending_name
                if kind == b"g":  # a global pax header applies to no one member
                    start = None
                continue
            name = pending_name or header[0:100].rstrip(b"\0").decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345:500].strip(b"\0") and not pending_name:
                name = header[345:500].rstrip(b"\0").decode("utf-8", "replace") + "/" + name
            if kind == b"5":  # tar writes a directory as `name/`; it is named without the slash
                name = name.rstrip("/")
            member = Member(name, kind, start, size, None)
            pending_name, start = None, None
            if member.is_file and self.want(name):
                payload = f.read(padded)
                if len(payload) < padded:
                    raise TarFormatError(f"truncated tar (member {name!r})")
                member.payload = payload[:size]
            else:
                _skip(f, padded)
            pos += padded
            self.end = pos
            yield member


def iter_members(f: BinaryIO, want: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, bytes | None, int]]:
    """(name, payload or None, size) of every regular file member, in order (TarWalk without the rest)."""
    for member in TarWalk(f, want):
        if member.is_file:
            yield member.name, member.payload, member.size


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
