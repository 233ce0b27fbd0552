"""`plait prep index DIR_OR_PATTERN`: make any WebDataset folder a plait dataset, without touching its tars.

Shards written by img2dataset, by `webdataset.ShardWriter` or by hand carry no `sizes.json` and no offset index.
This scans them (local paths or fsspec URLs, several shards at a time in threads: the work is I/O) and writes,
beside each shard S.tar, each file atomically (temporary name, then rename):

  S.idx.json     byte offset of every sample's first tar header (data_prep/shards/tarseek.py: resume inside a shard in
                 O(1) instead of walking the headers before the resume point)
  S_stats.json   sample count, member extensions, samples without an image or a text member; only where the
                 folder has no stats file for S (img2dataset's own are kept as they are)
  sizes.json     {"S.tar": num_samples, ...} per folder, open_clip's format; entries of shards not scanned are kept

The scan reads tar headers only and seeks over the payloads, so it costs one header read per member, not the
bytes of the images. Samples are grouped exactly as webdataset's `group_by_keys` groups them (regular files
only, `__meta__` names skipped, key = the name up to the first dot of its last component, a new sample where
the key changes), so the offsets are where the loader's own reader finds each sample.
"""
from __future__ import annotations

import argparse
import functools
import posixpath
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import fsspec

from data_prep.shards import layout, remote
from data_prep.shards.layout import INDEX_FORMAT
from data_prep.shards.members import CAPTION_KEYS, IMAGE_KEYS, MemberKeys
from data_prep.shards.scan import ShardScan, scan_shard, validate_sizes
from data_prep.shards.writer import OutputDir



@dataclass(frozen=True)
class IndexOptions:
    """`plait prep index`: what to scan and how."""

    target: str
    """A folder (its `*.tar`), one shard, a brace pattern (`shards/{00000..00099}.tar`) or a glob, local or an
    fsspec URL (s3://, gs://); not http(s), where the index could not be written beside the shards."""
    threads: int = 8
    """Shards scanned at once."""
    progress: bool = True
    """Show a progress bar."""
    image_keys: str = IMAGE_KEYS
    """Image members, tried in order (as data.image_keys): the samples without one are counted and reported."""
    caption_keys: str = CAPTION_KEYS
    """Caption members, tried in order: extensions or json:FIELD (as data.caption_keys)."""


def find_shards(target: str) -> list[str]:
    """The shard URLs of `target` (see IndexOptions.target), sorted; FileNotFoundError naming it when none."""
    remote.trust(target)
    fs, path = fsspec.core.url_to_fs(target)

    def url(p: str) -> str:  # glob gives bare paths; keep the user's form (plain local path or URL)
        return fs.unstrip_protocol(p) if "://" in target else p
    if "{" in target:
        import webdataset as wds  # here, not at the top: webdataset imports torch, and `plait prep` imports
        urls = wds.shardlists.expand_urls(target)  # this module for its help (5 s of every prep start-up)
    elif any(c in path for c in "*?["):
        urls = [url(p) for p in sorted(fs.glob(path))]
    elif fs.isdir(path):
        urls = [url(p) for p in sorted(fs.glob(path.rstrip("/") + "/*.tar"))]
        if not urls:
            raise FileNotFoundError(f"{target}: no *.tar files in this folder")
    else:
        urls = [target]
    urls = [u for u in urls if u.endswith(".tar")]
    if not urls:
        raise FileNotFoundError(f"{target}: matches no .tar files")
    return urls


def read_sizes(out: OutputDir) -> dict[str, int]:
    """A folder's sizes.json, validated: every count a non-negative integer (ValueError naming file and key)."""
    if not out.exists(layout.SIZES_FILE):
        return {}
    return validate_sizes(out.read_bytes(layout.SIZES_FILE), out.path(layout.SIZES_FILE))


def write_index(scans: list[ShardScan]) -> dict[str, dict[str, int]]:
    """Writes each readable shard's index (and stats where none exist) and every folder's sizes.json."""
    by_folder: dict[str, list[ShardScan]] = {}
    for scan in scans:
        by_folder.setdefault(posixpath.dirname(scan.url), []).append(scan)
    written = {}
    for folder, group in by_folder.items():
        out = OutputDir(folder or ".")
        try:
            sizes = read_sizes(out)
        except ValueError:  # a damaged sizes.json is what index exists to rewrite
            sizes = {}
        for scan in group:
            if scan.error is not None:
                sizes.pop(scan.name, None)  # a count for a tar that does not read to its end would mislead
                continue
            stem = scan.name[: -len(layout.TAR_SUFFIX)]
            out.write_json(stem + layout.INDEX_SUFFIX, {"format": INDEX_FORMAT, "keys": scan.keys,
                                                        "offsets": scan.offsets, "tar_bytes": scan.tar_bytes})
            if not out.exists(stem + layout.STATS_SUFFIX):
                out.write_json(stem + layout.STATS_SUFFIX, scan.stats())
            sizes[scan.name] = scan.num_samples
        out.write_json(layout.SIZES_FILE, dict(sorted(sizes.items())))
        written[folder] = sizes
    return written


def scan_all(urls: list[str], threads: int = 8, progress: bool = False,
             keys: MemberKeys | None = None) -> list[ShardScan]:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(urls), unit=" shards", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            scans = []
            for scan in pool.map(functools.partial(scan_shard, keys=keys), urls):
                scans.append(scan)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return scans


def index(opts: IndexOptions, log: Callable[[str], None] = print) -> list[ShardScan]:
    """Scans every shard of `opts.target` and writes what plait needs beside them; returns the scans."""
    if opts.threads < 1:
        raise ValueError(f"--threads {opts.threads}: must be >= 1")
    keys = MemberKeys.parse(opts.image_keys, opts.caption_keys, ("--image-keys", "--caption-keys"))
    if opts.target.startswith(("http://", "https://")):
        raise ValueError(f"{opts.target!r}: an http(s) server takes no uploads, so the index cannot be written "
                         "beside the shards; index them where they are stored (a folder, s3://, gs://)")
    urls = find_shards(opts.target)
    scans = scan_all(urls, opts.threads, opts.progress, keys)
    write_index(scans)
    bad = [s for s in scans if s.error]
    total = sum(s.num_samples for s in scans if not s.error)
    log(f"indexed {len(scans) - len(bad)} shard(s), {total} samples; wrote sizes.json, *.idx.json and missing "
        f"*_stats.json beside them")
    for s in scans:
        if not s.error and (s.without_image or s.without_text):
            log(f"  {s.name}: {s.without_image} sample(s) without an image, {s.without_text} without a caption; "
                f"first: {s.first_problem}")
    for s in bad:
        log(f"  {s.url}: {s.error}; left out of sizes.json")
    if total == 0 and not bad:
        log("  no samples: the shards hold no regular members grouped by key")
    return scans


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `plait prep index` flags; their help is IndexOptions' field docstrings."""
    from pipeline.flags import add_member_key_flags
    from pipeline.options import field_docs
    docs = field_docs(IndexOptions)
    p.add_argument("target", metavar="DIR_OR_PATTERN", help=docs["target"])
    p.add_argument("--threads", type=int, default=IndexOptions.threads, help=docs["threads"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_member_key_flags(p)


def main_args(a: argparse.Namespace) -> int:
    scans = index(IndexOptions(target=a.target, threads=a.threads, progress=not a.no_progress,
                               image_keys=a.image_keys, caption_keys=a.caption_keys))
    return 1 if any(s.error for s in scans) else 0
