"""Shard specs: `a::b` dataset lists with `@weight` mixing, brace expansion, fsspec URLs, exact sample counts.

A spec is one or more datasets joined with `::` (open_clip's separator). Each dataset is a brace-expanded
path or URL (`data/{00000..00099}.tar`, `s3://bucket/ds/{0000..0999}.tar`, `https://host/{00..09}.tar`),
optionally followed by `@weight` (`laion/{0..9}.tar@3::cc/{0..4}.tar@1`). A weight is the dataset's share of
the samples drawn in resampled mode (3:1 above means 75% of the samples come from laion, whatever its size).

Sample counts per shard come, in this order, from the folder's `sizes.json` (open_clip's convention, written by
`plait prep merge` and by `plait prep index` for shards from elsewhere), or from each shard's `{shard}_stats.json`
(plait: `num_samples`; img2dataset: `successes`). Without either, resampled mode estimates them from file sizes
(and says so); exact mode stops with the `plait prep index` command that writes them.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import webdataset as wds

from data_prep.shards import layout, remote
from data_prep.shards.scan import check_count, scan_shard, train_hint, validate_sizes
from data_prep.shards.tarseek import PIPE_PREFIX, check_no_pipe

log = logging.getLogger("plait.data")


@dataclass(frozen=True)
class ShardSet:
    """All shards of a spec in spec order, with their sample counts and the dataset each belongs to."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    dataset: tuple[int, ...]
    """Index of each shard's dataset in the spec."""
    weights: tuple[float, ...]
    """One weight per dataset (1.0 when none is given)."""

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    def shard_probabilities(self) -> np.ndarray:
        """Per-shard draw probabilities such that dataset d yields a fraction weight_d / sum(weights) of samples.

        Drawing shard s with probability p_s gives dataset d an expected sum_{s in d} p_s * size_s samples per
        draw; p_s proportional to weight_d / num_samples_d makes that proportional to weight_d."""
        sizes = np.asarray(self.sizes, dtype=np.float64)
        dataset = np.asarray(self.dataset)
        totals = np.bincount(dataset, weights=sizes, minlength=len(self.weights))
        p = np.asarray(self.weights)[dataset] / totals[dataset]
        return p / p.sum()


def split_weight(part: str) -> tuple[str, float]:
    """`spec@3.5` -> (spec, 3.5); an `@` not followed by a number belongs to the URL (user@host)."""
    head, sep, tail = part.rpartition("@")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            return part, 1.0
        if not weight > 0:
            raise ValueError(f"data.train_shards: weight of {head!r} must be positive, got {tail!r}")
        return head, weight
    return part, 1.0


def expand(pattern: str, allow_pipe: bool = False, flag: str = "") -> list[str]:
    """Brace-expanded URLs of one dataset; local paths must exist (checked here, before any worker starts).
    A `pipe:` pattern is a shell command: PipeRefused (a ValueError) unless `allow_pipe`; `flag` names the
    user's switch for it in the error."""
    urls = wds.shardlists.expand_urls(pattern)
    remote.trust(*urls)  # hosts typed in a spec may be private; where they redirect may not (remote.py)
    for url in [pattern.strip(), *urls]:  # `{pipe:a,b}` expands to one
        check_no_pipe(url, allow_pipe, flag)
    local = [u for u in urls if ("://" not in u or u.startswith("file://")) and not u.startswith(PIPE_PREFIX)]
    missing = [u for u in local if not fsspec.core.url_to_fs(u)[0].exists(fsspec.core.url_to_fs(u)[1])]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


# Sample count keys of per-shard stats files: plait's data_prep, then img2dataset's.
_COUNT_KEYS = ("num_samples", "successes")
# Estimated counts are scaled down by this much: a shard read short of its count costs bad samples (counted
# against data.max_bad_fraction), one read short of its end only leaves its last samples out of resampled draws.
ESTIMATE_MARGIN = 0.95


def _read_bytes(url: str) -> bytes | None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exn:
        if (refused := remote.refused_in(exn)) is not None:  # fsspec reports a refused redirect as not found
            raise refused from None
        return None


def _read_json(url: str) -> dict | None:
    raw = _read_bytes(url)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exn:
        raise ValueError(f"{url}: not valid JSON ({exn})") from None


def _sizes_table(folder: str) -> dict[str, int] | None:
    """A folder's sizes.json, every count checked (a negative or fractional count would skew the epoch)."""
    where = posixpath.join(folder, layout.SIZES_FILE) if folder else layout.SIZES_FILE
    raw = _read_bytes(where)
    return None if raw is None else validate_sizes(raw, where)


def _known_size(url: str, table: dict[str, int] | None) -> int | None:
    name = posixpath.basename(url)
    if table is not None and name in table:
        return table[name]
    if not url.endswith(layout.TAR_SUFFIX):
        return None
    stats_url = layout.sibling(url, layout.STATS_SUFFIX)
    stats = _read_json(stats_url)
    if not isinstance(stats, dict):
        return None
    key = next((k for k in _COUNT_KEYS if k in stats), None)
    return None if key is None else check_count(stats[key], stats_url, key)


def shard_sizes(urls: list[str], pattern: str | None = None, estimate: bool = False) -> list[int]:
    """Sample count of every shard, from sizes.json per folder or the shard's own stats file.

    Without either: `estimate` (resampled mode) estimates the counts from file sizes (see estimate_sizes) and
    says so; otherwise FileNotFoundError with the command that writes exact counts (`plait prep index`)."""
    tables: dict[str, dict[str, int] | None] = {}
    sizes: list[int | None] = []
    for url in urls:
        folder = posixpath.dirname(url)
        if folder not in tables:
            tables[folder] = _sizes_table(folder)
        sizes.append(_known_size(url, tables[folder]))
    missing = [i for i, n in enumerate(sizes) if n is None]
    if missing and not estimate:
        url = urls[missing[0]]
        folder = posixpath.dirname(url)
        where = posixpath.join(folder, layout.SIZES_FILE) if folder else f"./{layout.SIZES_FILE}"
        raise FileNotFoundError(
            f"no sample count for {url} ({len(missing)} of {len(urls)} shards): exact epochs need per-shard "
            f"counts, and {where} does not list it; write them with `{train_hint(pattern or url)}` "
            f"(no tar is changed), or train with data.mode=resampled (counts then estimated)")
    if missing:
        estimated = estimate_sizes([urls[i] for i in missing])
        for i, n in zip(missing, estimated):
            sizes[i] = n
        log.warning("data.train_shards: %d of %d shards have no sample count (no sizes.json or stats beside them); "
                    "estimated from their file sizes: ~%d samples. Run `%s` for exact counts.", len(missing),
                    len(urls), sum(estimated), train_hint(pattern or urls[missing[0]]))
    return sizes  # type: ignore[return-value]


def estimate_sizes(urls: list[str]) -> list[int]:
    """Counts of shards without one: the first shard of each folder is counted exactly by a header walk
    (data_prep/shards/scan.py); the others get its samples per byte times their own file size, x ESTIMATE_MARGIN."""
    by_folder: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        by_folder.setdefault(posixpath.dirname(url), []).append(i)
    out = [0] * len(urls)
    for folder, members in by_folder.items():
        probe = scan_shard(urls[members[0]])
        if probe.error is not None or probe.tar_bytes == 0:
            raise ValueError(f"cannot estimate sample counts: {probe.url}: {probe.error or 'empty file'}; "
                             f"run `plait prep verify {folder or '.'}`")
        per_byte = probe.num_samples / probe.tar_bytes
        fs = fsspec.core.url_to_fs(urls[members[0]])[0]
        for i in members:
            if i == members[0]:
                out[i] = probe.num_samples
                continue
            size = fs.size(fsspec.core.url_to_fs(urls[i])[1])
            out[i] = int(size * per_byte * ESTIMATE_MARGIN)
    return out


def parse_spec(spec: str, estimate: bool = False) -> ShardSet:
    """The ShardSet of `data.train_shards`; raises ValueError/FileNotFoundError naming the bad part.

    `estimate` (resampled mode): shards without a count get an estimated one instead of an error."""
    if not spec or not spec.strip():
        raise ValueError("config key 'data.train_shards' is empty: point it at shards, e.g. data/{00000..00009}.tar")
    urls, sizes, dataset, weights = [], [], [], []
    for index, part in enumerate(p.strip() for p in spec.split("::")):
        if not part:
            raise ValueError(f"data.train_shards: empty dataset in {spec!r} (stray '::'?)")
        pattern, weight = split_weight(part)
        if PIPE_PREFIX in pattern:
            raise ValueError(f"data.train_shards: {pattern!r} holds a pipe: command, which plait train never runs "
                             f"(it reads shards by byte range and needs their sample counts): give the shards' path "
                             f"or URL (https://, s3://, ...)")
        expanded = expand(pattern)
        counts = shard_sizes(expanded, pattern, estimate)
        if sum(counts) == 0:
            raise ValueError(f"data.train_shards: dataset {pattern!r} holds no samples")
        urls += expanded
        sizes += counts
        dataset += [index] * len(expanded)
        weights.append(weight)
    return ShardSet(tuple(urls), tuple(sizes), tuple(dataset), tuple(weights))
