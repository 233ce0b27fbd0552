"""Small synthetic tar shards written by data_prep's own writer (random JPEGs, captions, merge manifests)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.shards import manifest
from data_prep.shards.writer import OutputDir, Sample, write_shard


def jpeg(seed: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_shards(folder: Path, counts: list[int], prefix: str = "s", frames: int = 0,
                broken: dict[str, str] | None = None) -> str:
    """Shards via data_prep's writer + merge manifests (sizes.json); returns the brace spec.
    `broken` maps a key to 'jpeg' (undecodable image) or 'notxt' (caption missing)."""
    out, broken = OutputDir(str(folder)), broken or {}
    for shard, count in enumerate(counts):
        samples, records = [], []
        for i in range(count):
            key = f"{prefix}{shard:03d}{i:04d}"
            image = b"not a jpeg" if broken.get(key) == "jpeg" else jpeg(hash(key) % 10_000)
            media = [(f"f{j:04d}.jpg", jpeg(hash(key) % 10_000 + j)) for j in range(frames)] or [("jpg", image)]
            text = [] if broken.get(key) == "notxt" else [("txt", f"caption of {key}".encode())]
            samples.append(Sample(key, media + text + [("json", b"{}")]))
            records.append({**manifest.record(key, i, shard, None), "num_samples": 1})
        write_shard(out, shard, samples, records, count)
    manifest.write_dataset_manifests(out, range(len(counts)))
    return f"{folder}/{{00000..{len(counts) - 1:05d}}}.tar"
