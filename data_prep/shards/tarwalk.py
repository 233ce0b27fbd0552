"""The one tar reader of plait: the members of a WebDataset tar, and its samples as raw bytes, decoding nothing.

Every stage reads shards through it (the training loader and eval via tarseek, verify, index, merge, score and
filter), so they all see the same members and bytes; shards come from anywhere (plait's own, img2dataset's, any
WebDataset folder), so nothing here interprets a member beyond its name: no pickle (webdataset's default decoders
unpickle `.pyd` / `.pth` members), no extraction to disk, no links followed. A sample is the run of consecutive
regular members whose names share the key (members.split_name, as webdataset groups them).

A header walk instead of `tarfile`: tarfile builds a TarInfo per member with several copies (tens of microseconds),
which is most of the time of copying small members; here a member costs one 512-byte read and one payload read, or
a seek over the payload when the caller does not want it (`want`). Names and sizes follow tarfile's reading
(tests/test_tar_walk.py compares the two).
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


_MAX_META = 1 << 20  # a long name or pax header larger than this is not one a writer makes: refused unread
_CHUNK = 16 << 20  # payloads of unknown-length streams are read in pieces, so a lying size allocates nothing


def _number(field: bytes, name: str) -> int:
    """A numeric header field: octal text, or GNU base-256 (0x80: positive, 0xff: negative, as tarfile reads
    them). A negative or unparsable value is a TarFormatError."""
    if field and field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 256 ** (len(field) - 1)
    else:
        text = field.rstrip(b"\0 ").lstrip(b" ")
        try:
            value = int(text or b"0", 8)
        except ValueError:
            raise TarFormatError(f"bad tar header ({name} field {field[:12]!r})") from None
    if value < 0:
        raise TarFormatError(f"bad tar header (negative {name} {value})")
    return value


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].rstrip(b"\0 ").lstrip(b" ")
    try:
        want = int(stored or b"-1", 8)
    except ValueError:
        return False
    return want == sum(header[:148]) + 8 * 32 + sum(header[156:])


def pax_records(payload: bytes) -> dict[str, str]:
    """The records of a pax extended header, `LENGTH KEY=VALUE\\n` each, read by their lengths as tarfile reads
    them (a later record of a key wins). TarFormatError for a record whose length does not fit."""
    records, pos = {}, 0
    while pos < len(payload) and payload[pos:pos + 1] not in (b"\0", b""):
        space = payload.find(b" ", pos, pos + 21)
        length = int(payload[pos:space]) if space > pos and payload[pos:space].isdigit() else -1
        end = pos + length
        if length <= space - pos or end > len(payload) or payload[end - 1:end] != b"\n":
            raise TarFormatError(f"bad pax header record at byte {pos}")
        key, eq, value = payload[space + 1:end - 1].partition(b"=")
        if not eq:
            raise TarFormatError(f"bad pax header record at byte {pos} (no '=')")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos = end
    return records


def _remaining_bytes(f: BinaryIO) -> int | None:
    """Bytes from `f`'s position to its end where a file can say cheaply (local and fsspec files), else None."""
    try:
        pos = f.tell()
        size = getattr(f, "size", None)
        if isinstance(size, int):
            return size - pos
        if f.seekable():
            end = f.seek(0, 2)
            f.seek(pos)
            return end - pos
    except (AttributeError, OSError, ValueError):
        pass
    return None


def _read(f: BinaryIO, n: int, what: str) -> bytes:
    """Exactly `n` bytes, in pieces (no allocation of a size the file does not hold); TarFormatError if short."""
    if n <= _CHUNK:
        data = f.read(n)
    else:
        parts, left = [], n
        while left:
            part = f.read(min(left, _CHUNK))
            if not part:
                break
            parts.append(part)
            left -= len(part)
        data = b"".join(parts)
    if len(data) < n:
        raise TarFormatError(f"truncated tar ({what})")
    return data


@dataclass
class Member:
    name: str
    kind: bytes
    """The tar type flag: b"0" (or b"\\0") a regular file; b"5" a directory, b"2" a symlink, b"1" a hard link..."""
    offset: int
    """Of its first header block (its long-name or pax header where it has one), from where the walk started:
    where a seek-by-index starts."""
    size: int
    payload: bytes | None
    """The bytes of a regular file the walker was told to read, else None."""

    @property
    def is_file(self) -> bool:
        return self.kind in (b"0", b"\0", b"7")  # 7: contiguous file, a regular file to every reader


class TarWalk:
    """Every member of a tar in order, files and not (directories, links, devices), with its offset: the one tar
    reader of plait (training, eval, verify, index, merge, score, filter). Names and sizes are read as Python's
    tarfile reads them (GNU long names, pax `path`/`size` records, global pax headers, base-256 numbers), and
    every size is checked against what the file still holds before anything is read or allocated.

    `want(name)` says which regular files' payloads to read; the others are seeked over (read past on a stream
    that cannot seek). After the iteration, `end` is the offset just past the last member's padded payload: a
    file shorter than `end` + 1024 lacks the end-of-archive blocks (a writer killed between two members).
    Raises TarFormatError on a bad header, a size the file does not hold, or a truncated payload."""

    def __init__(self, f: BinaryIO, want: Callable[[str], bool] = lambda name: True) -> None:
        self.f, self.want, self.end = f, want, 0
        self.remaining = _remaining_bytes(f)

    def _check_fits(self, pos: int, padded: int, name: str, size: int) -> None:
        if self.remaining is not None and pos + padded > self.remaining:
            left = max(0, self.remaining - pos)
            raise TarFormatError(f"truncated tar (member {name!r} declares {size} bytes, {left} left)")

    def __iter__(self) -> Iterator[Member]:
        f, pos, start = self.f, 0, None
        global_pax: dict[str, str] = {}
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            header = f.read(_BLOCK)
            if not header or header == bytes(_BLOCK):
                return
            if len(header) < _BLOCK:
                raise TarFormatError(f"truncated tar header ({len(header)} bytes)")
            if not _checksum_ok(header):
                raise TarFormatError("tar header checksum mismatch (not a tar, or corrupt)")
            size, kind = _number(header[124:136], "size"), header[156:157]
            start = pos if start is None else start
            pos += _BLOCK
            if kind in (b"L", b"K", b"x", b"g"):  # GNU long name/link, pax headers: they describe the next member
                if size > _MAX_META:
                    raise TarFormatError(f"{'long name' if kind == b'L' else 'pax header'} of {size} bytes")
                padded = -(-size // _BLOCK) * _BLOCK
                self._check_fits(pos, padded, "(extended header)", size)
                payload = _read(f, padded, "extended header")[:size]
                pos += padded
                if kind == b"L":
                    long_name = payload.rstrip(b"\0").decode("utf-8", "replace")
                elif kind == b"K":  # a link's long target: no sample reads links
                    pass
                elif kind == b"x":
                    pax = {**pax, **pax_records(payload)}
                else:  # a global pax header applies to every member after it, and to no one member itself
                    global_pax.update(pax_records(payload))
                    start = None
                continue
            records = {**global_pax, **pax}
            # as tarfile: each field ends at its first NUL; the ustar prefix joins every name but GNU's own types
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and kind not in (b"L", b"K", b"S"):
                name = prefix.decode("utf-8", "replace") + "/" + name
            if kind == b"\0" and name.endswith("/"):  # old V7 tar writes a directory as a file named `name/`
                kind = b"5"
            name = records.get("path") or long_name or name
            if kind == b"S" or any(k.startswith("GNU.sparse.") for k in records):
                # tarfile expands a sparse file's holes from a map held in extra header blocks (old GNU) or in
                # the data itself (pax 1.0); no WebDataset writer makes one, so one verdict for every stage
                raise TarFormatError(f"sparse member {records.get('GNU.sparse.name', name)!r}: WebDataset shards "
                                     "hold no sparse files")
            if "size" in records:
                if not records["size"].isdigit():
                    raise TarFormatError(f"bad pax size record {records['size'][:30]!r}")
                size = int(records["size"])
            if kind == b"5":  # tar writes a directory as `name/`; it is named without the slash
                name = name.rstrip("/")
            padded = -(-size // _BLOCK) * _BLOCK
            member = Member(name, kind, start, size, None)
            long_name, pax, start = None, {}, None
            if kind in (b"1", b"2", b"3", b"4", b"5", b"6"):
                padded = 0  # links, devices, directories and fifos hold no data, whatever their size says
            self._check_fits(pos, padded, name, size)
            if member.is_file and self.want(name):
                member.payload = _read(f, padded, f"member {name!r}")[:size]
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
