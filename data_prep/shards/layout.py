"""The shard layout: how a plait dataset folder and its samples are named. The one place both sides read it
from: data_prep writes by it, the training loader, evaluation and exports read by it.

Files of a dataset folder (shard S written as `{S:05d}`):
  S.tar            samples in key order; per sample `{key}.jpg|png|webp` (video: `{key}.f0000.jpg`, ...,
                   and `{key}.mp4`, the clip itself, under --clip-format mp4), `{key}.txt` (caption),
                   `{key}.json` (metadata), `{key}.cls` (ascii int label) when it has one
  S.idx.json       member index, format "plait-tar-index/1": byte offset of each sample's first tar member
  S.parquet        one record per input row of the shard (data_prep/shards/manifest.py)
  S_stats.json     counts and reasons, format "plait-shard/1"; written last: the shard's done marker
  sizes.json       {"S.tar": num_samples} (open_clip's convention); manifest.json (format "plait-dataset/1");
  samples.parquet  every input row's record; _plan.json: the job's settings

This module imports nothing of plait's, so any module on either side can import it without a cycle.
"""
from __future__ import annotations

import json
import re
from typing import Any

TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "plait-tar-index/1"
RECORDS_SUFFIX = ".parquet"
STATS_SUFFIX = "_stats.json"
STATS_FORMAT = "plait-shard/1"
SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "plait-dataset/1"
RECORDS_FILE = "samples.parquet"
PLAN_FILE = "_plan.json"
# The files beside the shards that identify a dataset's content (recorded, hashed, in model cards).
CONTENT_FILES = (MANIFEST_FILE, SIZES_FILE, RECORDS_FILE)
CLASSNAMES_FILE = "classnames.txt"
"""One class name per line, in label-id order, beside the shards (`plait eval` and `plait finetune` read it)."""

ENCODE_FORMATS = ("jpg", "png", "webp")
"""Image formats data_prep writes."""
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image members readers accept (shards from other tools may say jpeg)."""
FRAME_MEMBER = re.compile(r"^f(\d+)\.(jpg|jpeg|png|webp)$")
"""A video frame member (after the sample key): `f0000.jpg`, `f0001.jpg`, ... in time order."""
CLIP_MEMBER = "mp4"
"""The member holding a sample's clip under --clip-format mp4: `{key}.mp4`, WebDataset's name for video."""


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def tar_name(shard_id: int) -> str:
    return shard_name(shard_id) + TAR_SUFFIX


def index_name(shard_id: int) -> str:
    return shard_name(shard_id) + INDEX_SUFFIX


def records_name(shard_id: int) -> str:
    return shard_name(shard_id) + RECORDS_SUFFIX


def stats_name(shard_id: int) -> str:
    return shard_name(shard_id) + STATS_SUFFIX


def sibling(tar_url: str, suffix: str) -> str:
    """The index or stats file beside a shard: `.../00007.tar` -> `.../00007.idx.json` (INDEX_SUFFIX)."""
    return tar_url[: -len(TAR_SUFFIX)] + suffix if tar_url.endswith(TAR_SUFFIX) else tar_url + suffix


def frame_member(index: int, ext: str) -> str:
    return f"f{index:04d}.{ext}"


def frame_number(member: str) -> int | None:
    """The frame index of a video frame member (`f0003.jpg` -> 3), None for anything else."""
    m = FRAME_MEMBER.match(member)
    return int(m.group(1)) if m else None


def text_members(caption: str, meta: dict[str, Any]) -> list[tuple[str, bytes]]:
    """A sample's caption, metadata and (when the metadata has an int `cls`) label members, in tar order."""
    members = [("txt", caption.encode()), ("json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())]
    if isinstance(meta.get("cls"), int):
        members.append(("cls", str(meta["cls"]).encode()))  # webdataset / clip_benchmark label convention
    return members


# Every character Python's str.splitlines() breaks a line at: a class name holding one would shift the ids of
# every later class for a reader that splits that way.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def classname_problem(name: str) -> str | None:
    """Why `name` cannot be a class name in classnames.txt (None: it can)."""
    if _LINE_BREAKS.search(name):
        return f"class name {name[:60]!r} holds a line break"
    return None


def format_classnames(names) -> bytes:
    """classnames.txt's bytes; ValueError for a name that would not read back as one line."""
    for name in names:
        problem = classname_problem(name)
        if problem:
            raise ValueError(problem)
    return ("\n".join(names) + "\n").encode("utf-8")


def parse_classnames(text: str) -> list[str]:
    """The class names of a classnames file, split at newlines only (a trailing \\r of CRLF files is stripped
    with the other surrounding whitespace); blank lines are skipped. Every reader goes through this."""
    return [line.strip() for line in text.split("\n") if line.strip()]


def check_shard_name(name: object, where: str) -> str:
    """`name` if it is a plain tar file name (`00003.tar`, `shard-a.tar`): what a manifest, sizes.json, index or
    score file names is joined to its own folder, so a name that is a path (`../x.tar`, `/etc/x.tar`, `a/b.tar`,
    `C:x.tar`) would read or write outside it. ValueError naming the file and the name otherwise."""
    if (not isinstance(name, str) or not name.endswith(TAR_SUFFIX) or name in ("", ".", "..")
            or any(c in name for c in "/\\\0:") or name.startswith(".") or len(name) > 255):
        raise ValueError(f"{where}: shard name {name!r} is not a plain .tar file name in its folder")
    return name
