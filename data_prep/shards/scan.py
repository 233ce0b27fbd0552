"""What a tar holds, read from its headers alone, and the counts files beside it: the one scan that `plait prep
index` and `prep verify` run over any WebDataset folder and that the loader runs to estimate the sizes of a
folder without counts.

Samples are grouped as webdataset's `group_by_keys` groups them (regular files only, `__meta__` names skipped,
key = the name up to the first dot of its last component, a new sample where the key changes; members.py), so
the offsets are where the loader's own reader finds each sample. Payloads are seeked over: one header read per
member, not the bytes of the images.
"""
from __future__ import annotations

import json
import posixpath
import shlex
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec

from data_prep.shards.layout import check_shard_name
from data_prep.shards.members import MemberKeys, split_name
from data_prep.shards.tarwalk import TarWalk


@dataclass
class ShardScan:
    """What one tar holds, in the loader's terms."""

    url: str
    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    """Byte offset of the first header (long-name and pax headers included) of each sample."""
    extensions: Counter = field(default_factory=Counter)
    without_image: int = 0
    without_text: int = 0
    first_problem: str | None = None
    """Why the first sample without an image or a caption has none, naming the key to set."""
    other_members: list[str] = field(default_factory=list)
    """Directories, links and devices: webdataset skips them; `verify` reports them."""
    tar_bytes: int = 0
    error: str | None = None
    """Why the tar could not be read to its end (the counts then cover what came before)."""

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)

    def stats(self) -> dict[str, Any]:
        return {"format": "plait-index-stats/1", "tar": self.name, "num_samples": self.num_samples,
                "bytes": self.tar_bytes, "extensions": dict(sorted(self.extensions.items())),
                "samples_without_image": self.without_image, "samples_without_text": self.without_text,
                "other_members": len(self.other_members)}


def scan_shard(url: str, keys: MemberKeys | None = None) -> ShardScan:
    """Walks the tar headers of `url` (payloads are skipped by seeking); never raises for a bad tar. Samples
    are counted as lacking an image or a caption by `keys` (the loader's rule)."""
    scan, keys = ShardScan(url), keys or MemberKeys.parse()
    fs, path = fsspec.core.url_to_fs(url)
    current: str | None = None
    members: set[str] = set()
    try:
        with fs.open(path, "rb") as f:
            walk = TarWalk(f, want=lambda name: False)  # headers only: payloads are seeked over
            for member in walk:
                if not member.is_file:
                    scan.other_members.append(member.name)
                    continue
                parts = split_name(member.name)  # the format's own rule (metadata and extension-less: no sample)
                if parts is None:
                    continue
                key, ext = parts
                if key != current:
                    _close_sample(scan, members, keys)
                    current, members = key, set()
                    scan.keys.append(key)
                    scan.offsets.append(member.offset)
                members.add(ext)
                scan.extensions[ext] += 1
            _close_sample(scan, members, keys)
            scan.tar_bytes = fs.size(path)
        if scan.tar_bytes < walk.end + 1024:  # a writer killed between two members: no end-of-archive blocks
            scan.error = (f"truncated tar: no end-of-archive blocks after its last member ({scan.num_samples} "
                          "samples read)")
    except FileNotFoundError:
        scan.error = "missing"
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as exn:  # TarFormatError is a ValueError
        _close_sample(scan, members, keys)
        scan.error = f"unreadable tar after {scan.num_samples} samples ({type(exn).__name__}: {exn})"
    return scan


def _close_sample(scan: ShardScan, members: set[str], keys: MemberKeys) -> None:
    if not members:
        return
    if not keys.image_members(members)[0]:  # frames of a video sample ({key}.f0000.jpg) count as its image
        scan.without_image += 1
        scan.first_problem = scan.first_problem or keys.missing_image(members)
    if keys.caption_member(members) is None:
        scan.without_text += 1
        scan.first_problem = scan.first_problem or keys.missing_caption(members)
    members.clear()


def validate_sizes(raw: bytes, where: str) -> dict[str, int]:
    """The counts of a sizes.json's bytes; ValueError naming `where` and the bad key."""
    try:
        table = json.loads(raw)
    except ValueError as exn:
        raise ValueError(f"{where}: not valid JSON ({exn})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected an object {{\"shard.tar\": count}}, got {type(table).__name__}")
    return {check_shard_name(key, where): check_count(value, where, key) for key, value in table.items()}


def check_count(value: Any, where: str, key: str) -> int:
    """`value` if it is a non-negative integer, else ValueError naming the file and key it came from."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: count of {key!r} must be a non-negative integer, got {value!r}")
    return value


def train_hint(pattern: str) -> str:
    """The exact command that writes the counts for `pattern` (used in the loader's error messages)."""
    return f"plait prep index {shlex.quote(pattern)}"
