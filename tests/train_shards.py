"""Small real-data shards for the training tests: the first Fashion-MNIST test images as jpg/txt/cls samples."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def fashion_mnist(count: int, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images [N, 28, 28] uint8 and labels [N] of a split (idx files: 16/8-byte headers)."""
    with gzip.open(FMNIST / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    with gzip.open(FMNIST / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:count]
    return images, labels


def write_shards(folder: Path, num_shards: int, per_shard: int, offset: int = 0) -> str:
    """Writes `num_shards` tars (+ sizes.json) and returns their brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = fashion_mnist(offset + num_shards * per_shard)
    sizes = {}
    for s in range(num_shards):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(offset + s * per_shard, offset + (s + 1) * per_shard):
                buf = io.BytesIO()
                Image.fromarray(images[i]).convert("RGB").save(buf, format="JPEG", quality=95)
                sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(),
                            "txt": f"a photo of a {CLASSES[labels[i]]}.", "cls": str(int(labels[i]))})
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{{00000..{num_shards - 1:05d}}}.tar")
