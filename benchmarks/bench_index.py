"""`plait prep index` vs counting samples with webdataset itself, on the same foreign shards.

Shards are written by webdataset's own ShardWriter from real photos (opencv-doc examples and mate-backgrounds,
original JPEG bytes, so payloads range from a few KB to several MB as on the web) with a caption and a json per
sample, and no sizes.json. Both sides scan every shard with the same number of threads and produce the sample
count of each shard: plait walks the tar headers and seeks over the payloads (and also writes the offset index
and stats); the peer iterates `wds.WebDataset(url)` samples, which reads every byte. Each side runs `--repeats`
times with a warm page cache; the best time counts. Prints shards/s, samples/s, MB/s of tar scanned, the ratio,
and checks that both sides found the same counts.

Usage: .venv/bin/python benchmarks/bench_index.py [--shards 8] [--per-shard 150] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.maintenance.index import IndexOptions, index  # noqa: E402

PHOTO_DIRS = [Path("/usr/share/doc/opencv-doc/examples/data"), Path("/usr/share/backgrounds/mate")]


def write_shards(folder: Path, shards: int, per_shard: int) -> int:
    photos = sorted(p for d in PHOTO_DIRS for p in d.rglob("*.jpg"))
    if not photos:
        sys.exit("no photos: apt-get install opencv-doc mate-backgrounds")
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            photo = photos[i % len(photos)]
            sink.write({"__key__": f"{i:08d}", "jpg": photo.read_bytes(), "txt": f"a photo: {photo.stem}",
                        "json": json.dumps({"source": photo.name})})
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def count_with_webdataset(urls: list[str], threads: int) -> dict[str, int]:
    def count(url: str) -> int:
        return sum(1 for _ in wds.WebDataset(url, shardshuffle=False, empty_check=False))
    with ThreadPoolExecutor(threads) as pool:
        return {Path(u).name: n for u, n in zip(urls, pool.map(count, urls))}


def best(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "foreign"
        folder.mkdir()
        total_bytes = write_shards(folder, args.shards, args.per_shard)
        urls = sorted(str(p) for p in folder.glob("*.tar"))
        samples = args.shards * args.per_shard
        count_with_webdataset(urls, args.threads)  # warm the page cache for both sides
        t_plait, _ = best(lambda: index(IndexOptions(str(folder), threads=args.threads, progress=False),
                                        log=lambda _: None), args.repeats)
        t_wds, counts = best(lambda: count_with_webdataset(urls, args.threads), args.repeats)
        sizes = json.loads((folder / "sizes.json").read_text())
        assert sizes == counts, (sizes, counts)
        mb = total_bytes / 1e6
        print(f"{len(urls)} shards, {samples} samples, {mb:.0f} MB of tar, {args.threads} threads, best of "
              f"{args.repeats}")
        print(f"plait prep index:         {t_plait:.3f} s  {len(urls) / t_plait:8.1f} shards/s  "
              f"{samples / t_plait:9.0f} samples/s  {mb / t_plait:8.0f} MB/s")
        print(f"webdataset sample count:  {t_wds:.3f} s  {len(urls) / t_wds:8.1f} shards/s  "
              f"{samples / t_wds:9.0f} samples/s  {mb / t_wds:8.0f} MB/s")
        print(f"ratio (plait / webdataset, samples/s): {t_wds / t_plait:.2f}x  (counts agree: {sum(sizes.values())})")


if __name__ == "__main__":
    main()
