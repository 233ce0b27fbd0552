"""The format's one tar reader (data_prep/shards/tarwalk.py) against Python's tarfile, the reader webdataset and
every other WebDataset tool use: the same names, sizes and bytes for pax, GNU long-name and base-256 headers;
and hostile headers (sizes the file does not hold, pax records of absurd lengths, negative base-256 numbers)
end as a bad shard, never as a MemoryError or OverflowError, in `prep index` and `prep verify` too."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from data_prep.cli import main
from data_prep.shards.tarwalk import TarFormatError, TarWalk, iter_samples

BLOCK = 512


def _checksummed(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _member(name: str, data: bytes, fmt=tarfile.PAX_FORMAT, pax: dict | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    if pax:
        info.pax_headers = pax
    return info.tobuf(fmt, "utf-8", "surrogateescape") + data + bytes(-len(data) % BLOCK)


def _pax_header(records: bytes, typeflag: bytes = b"x") -> bytes:
    header = bytearray(tarfile.TarInfo("././@PaxHeader").tobuf(tarfile.USTAR_FORMAT))
    header[124:136] = b"%011o\0" % len(records)
    header[156:157] = typeflag
    return _checksummed(header) + records + bytes(-len(records) % BLOCK)


def _record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _base256_size(name: str, data: bytes) -> bytes:
    header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"\x80" + len(data).to_bytes(11, "big")
    return _checksummed(header) + data + bytes(-len(data) % BLOCK)


END = bytes(2 * BLOCK)


def _with_size_field(name: str, field: bytes, typeflag: bytes = b"0") -> bytes:
    header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.GNU_FORMAT))
    header[124:136], header[156:157] = field, typeflag
    return _checksummed(header)


def _tarfile_view(raw: bytes) -> list[tuple[str, int, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m.name, m.size, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _walk_view(raw: bytes) -> list[tuple[str, int, bytes]]:
    return [(m.name, m.size, m.payload) for m in TarWalk(io.BytesIO(raw)) if m.is_file]


def _patched(name: str, data: bytes, at: int, raw: bytes, typeflag: bytes = b"0") -> bytes:
    """A GNU-format member whose header holds `raw` at byte `at` (fields tarfile reads up to their first NUL)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[at:at + len(raw)], header[156:157] = raw, typeflag
    return _checksummed(header) + data + bytes(-len(data) % BLOCK)


LONG = "d/" + "x" * 180 + ".txt"
CASES = {
    "name field ending at its first NUL": _patched("n.txt", b"nul", 5, b"\0junk") + END,
    "prefix field ending at its first NUL (GNU atime/ctime)": _patched("p.txt", b"gnu", 345, b"\0" + b"1" * 23) + END,
    "ustar prefix joined": _patched("q.txt", b"pre", 345, b"dir") + END,
    "V7 directory written as a file named 'd/'": _patched("d/", b"", 0, b"", typeflag=b"\0")
    + _member("d/e.txt", b"in") + END,
    "pax long path": _member(LONG, b"long") + END,
    "gnu long name": _member(LONG, b"gnu", fmt=tarfile.GNU_FORMAT) + END,
    "pax path given twice: the last wins": _pax_header(_record("path", "a.txt") + _record("path", "b.txt"))
    + _member("c.txt", b"which", fmt=tarfile.USTAR_FORMAT) + END,
    "pax size record overrides the header's": _pax_header(_record("size", "1000"))
    + _with_size_field("s.jpg", b"%011o\0" % 0) + b"\x01" * 1000 + bytes(24) + END,
    "global pax path": _pax_header(_record("comment", "x"), b"g") + _member("g.txt", b"global") + END,
    "base-256 size": _base256_size("b.jpg", b"base256") + END,
    "unicode names": _member("ключ.txt", "текст".encode()) + END,
}


@pytest.mark.parametrize("case", CASES)
def test_the_walk_reads_what_tarfile_reads(case):
    raw = CASES[case]
    assert _walk_view(raw) == _tarfile_view(raw)


def test_samples_group_as_webdataset_groups_them():
    raw = b"".join(_member(n, n.encode()) for n in ("a.jpg", "a.txt", "b.jpg", "b.txt", "a.json")) + END
    assert [(s.key, [e for e, _ in s.members]) for s in iter_samples(io.BytesIO(raw))] == [
        ("a", ["jpg", "txt"]), ("b", ["jpg", "txt"]), ("a", ["json"])]


HOSTILE = {
    "pax header declaring 16 TiB": _with_size_field("././@PaxHeader", b"%011o\0" % (16 << 40), b"x") + END,
    "pax size record of 16 TiB": _pax_header(_record("size", str(16 << 40))) + _member("a.jpg", b"x")[:BLOCK] + END,
    "pax record length 10^20": _pax_header(b"100000000000000000000 path=a.txt\n") + _member("a.jpg", b"x") + END,
    "base-256 size of twelve 0xff": _with_size_field("a.jpg", b"\xff" * 12) + END,
    "member larger than the file": _with_size_field("a.jpg", b"%011o\0" % (1 << 30)) + bytes(BLOCK) + END,
}


def _hostile(case: str) -> bytes:
    return HOSTILE[case]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_headers_are_a_format_error_not_a_crash(case):
    with pytest.raises(TarFormatError):
        list(TarWalk(io.BytesIO(_hostile(case))))


class _Stream(io.RawIOBase):
    """A stream that cannot seek or tell (an HTTP body): sizes cannot be checked ahead, reads must stay small."""

    def __init__(self, raw: bytes) -> None:
        self._f = io.BytesIO(raw)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        assert n < (64 << 20), f"allocated a read of {n} bytes"
        return self._f.read(n)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_headers_on_a_stream_allocate_nothing_large(case):
    with pytest.raises(TarFormatError):
        list(TarWalk(_Stream(_hostile(case))))


@pytest.mark.parametrize("case", ["pax header declaring 16 TiB", "pax record length 10^20",
                                  "base-256 size of twelve 0xff"])
def test_index_and_verify_report_a_hostile_shard_and_go_on(tmp_path, case, capsys):
    (tmp_path / "00000.tar").write_bytes(_member("a.jpg", b"x") + _member("a.txt", b"cap") + END)
    (tmp_path / "00001.tar").write_bytes(_hostile(case))
    assert main(["index", str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "00001.tar: unreadable tar after 0 samples (TarFormatError" in out
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 1}
    assert main(["verify", str(tmp_path)]) == 1
    assert "00001.tar: unreadable tar after 0 samples (TarFormatError" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_members_are_one_verdict_everywhere(tmp_path, fmt, capsys):
    """Fixture: GNU tar's --sparse archive of a file with a hole, in old-GNU ('S' members with a sparse map in
    the header) and pax 1.0 (GNU.sparse.* records, the map inside the data) forms; tarfile would expand the
    holes, plait's one walk refuses the shard in index and verify alike."""
    import subprocess
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"caption")
    with open(src / "a.jpg", "wb") as f:
        f.write(b"head")
        f.seek(1 << 20)
        f.write(b"tail")
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", str(data / "00000.tar"), "-C", str(src),
                    "a.jpg", "a.txt"], check=True)
    with tarfile.open(data / "00000.tar") as t:
        assert t.getmember("a.jpg").issparse() if fmt == "gnu" else t.getmember("a.jpg").size == (1 << 20) + 4
    with pytest.raises(TarFormatError, match="sparse member 'a.jpg'"):
        list(TarWalk(open(data / "00000.tar", "rb")))
    assert main(["index", str(data), "--no-progress"]) == 1
    assert "sparse member 'a.jpg'" in capsys.readouterr().out
    assert main(["verify", str(data)]) == 1
    assert "sparse member 'a.jpg'" in capsys.readouterr().out
