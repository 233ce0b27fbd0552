"""Shard specs: `a::b` dataset lists with `@weight` mixing, brace expansion, fsspec URLs, exact sample counts.

A spec is one or more datasets joined with `::` (open_clip's separator). Each dataset is a brace-expanded
path or URL (`data/{00000..00099}.tar`, `s3://bucket/ds/{0000..0999}.tar`, `https://host/{00..09}.tar`),
optionally followed by `@weight` (`laion/{0..9}.tar@3::cc/{0..4}.tar@1`). A weight is the dataset's share of
the samples drawn in resampled mode (3:1 above means 75% of the samples come from laion, whatever its size).

Sample counts per shard come, in this order, from the folder's `sizes.json` (open_clip's convention, written by
`plait prep merge`), or from each shard's `{shard}_stats.json` (plait: `num_samples`; img2dataset: `successes`).
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import webdataset as wds

from pipeline.tarseek import PIPE_PREFIX, check_no_pipe


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
    for url in [pattern.strip(), *urls]:  # `{pipe:a,b}` expands to one
        check_no_pipe(url, allow_pipe, flag)
    local = [u for u in urls if ("://" not in u or u.startswith("file://")) and not u.startswith(PIPE_PREFIX)]
    missing = [u for u in local if not fsspec.core.url_to_fs(u)[0].exists(fsspec.core.url_to_fs(u)[1])]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


# Sample count keys of per-shard stats files: plait's data_prep, then img2dataset's.
_COUNT_KEYS = ("num_samples", "successes")


def _read_json(url: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def shard_sizes(urls: list[str]) -> list[int]:
    """Sample count of every shard, from sizes.json per folder or the shard's own stats file."""
    by_folder: dict[str, dict | None] = {}
    sizes = []
    for url in urls:
        folder, name = posixpath.split(url)
        if folder not in by_folder:
            by_folder[folder] = _read_json(posixpath.join(folder, "sizes.json"))
        table = by_folder[folder]
        if table is not None and name in table:
            sizes.append(int(table[name]))
            continue
        stats = _read_json(url[: -len(".tar")] + "_stats.json") if url.endswith(".tar") else None
        count = None if stats is None else next((stats[k] for k in _COUNT_KEYS if k in stats), None)
        if count is None:
            raise FileNotFoundError(f"no sample count for {url}: expected {folder}/sizes.json (plait prep merge) "
                                    f"or {name[:-4]}_stats.json beside it; exact epochs need per-shard counts")
        sizes.append(int(count))
    return sizes


def parse_spec(spec: str) -> ShardSet:
    """The ShardSet of `data.train_shards`; raises ValueError/FileNotFoundError naming the bad part."""
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
        counts = shard_sizes(expanded)
        if sum(counts) == 0:
            raise ValueError(f"data.train_shards: dataset {pattern!r} holds no samples")
        urls += expanded
        sizes += counts
        dataset += [index] * len(expanded)
        weights.append(weight)
    return ShardSet(tuple(urls), tuple(sizes), tuple(dataset), tuple(weights))
