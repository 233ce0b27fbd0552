"""Real Fashion-MNIST shards (a small subset, written with webdataset's TarWriter) and a briefly trained plait
checkpoint on them, shared by the export, eval and finetune tests (trained once per test session)."""
from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep.input.sources import FASHION_MNIST_CLASSES, fashion_mnist_caption

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": "train", "test": "t10k"}
EVAL_TEMPLATES = ("a photo of {}", "a picture of {}")  # classnames carry no article: "a photo of sneaker"
_CACHE: dict = {}


def read_fmnist(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` images [n, 28, 28] uint8 and labels [n] of a split."""
    if not (FMNIST / f"{FILES[split]}-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
    with gzip.open(FMNIST / f"{FILES[split]}-images-idx3-ubyte.gz") as fi, \
            gzip.open(FMNIST / f"{FILES[split]}-labels-idx1-ubyte.gz") as fl:
        _, count, h, w = struct.unpack(">IIII", fi.read(16))
        fl.read(8)
        n = min(n, count)
        images = np.frombuffer(fi.read(n * h * w), dtype=np.uint8).reshape(n, h, w)
        labels = np.frombuffer(fl.read(n), dtype=np.uint8)
    return images, labels


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **(
        {"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


def write_shards(folder: Path, split: str, n: int, per_shard: int, fmt: str = "png", names: str = "{:05d}.tar",
                 captions: bool = True, labels: bool = True) -> list[str]:
    """Fashion-MNIST samples as tar shards (plait/img2dataset member names), sizes.json, classnames.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    images, ys = read_fmnist(split, n)
    urls, sizes = [], {}
    for shard, start in enumerate(range(0, len(images), per_shard)):
        path = folder / names.format(shard)
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, min(start + per_shard, len(images))):
                sample = {"__key__": f"{i:09d}", fmt: encode(images[i], fmt)}
                if captions:
                    sample["txt"] = fashion_mnist_caption(i, int(ys[i]))
                if labels:
                    sample["cls"] = int(ys[i])
                sink.write(sample)
        sizes[path.name] = min(start + per_shard, len(images)) - start
        urls.append(str(path))
    (folder / "sizes.json").write_text(json.dumps(sizes))
    (folder / "classnames.txt").write_text("\n".join(FASHION_MNIST_CLASSES) + "\n")
    return urls


def spec(urls: list[str]) -> str:
    return "::".join(urls)


# Half the demo's fmnist-vit in width and depth, so the shared CPUs train it in about a minute; registered as
# an open_clip config (model.name accepts any open_clip model name).
TEST_MODEL = "plait-test-fmnist"
TEST_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 64, "head_width": 32, "patch_size": 7},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
STEPS, BATCH = 30, 64


def register_test_model(folder: Path) -> None:
    import open_clip

    path = folder / f"{TEST_MODEL}.json"
    path.write_text(json.dumps(TEST_MODEL_CFG))
    open_clip.add_model_config(path)


def trained_run(tmp_path_factory) -> dict:
    """{'run_dir', 'train', 'test', 'root'}: the test model trained STEPS steps of BATCH on 1,920 images."""
    if "run" in _CACHE:
        return _CACHE["run"]
    from pipeline.config import load_config
    from pipeline.train.loop import run

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("fmnist")
    register_test_model(root)
    train = write_shards(root / "train", "train", 1920, 480)
    test = write_shards(root / "test", "test", 600, 300)
    cfg = load_config(None, [
        f"model.name='{TEST_MODEL}'", f"data.train_shards='{root}/train/{{00000..00003}}.tar'",
        f"data.batch_size={BATCH}", "data.num_workers=0", f"train.steps={STEPS}", f"train.run_dir='{root}/run'",
        "train.device='cpu'", "optim.warmup_steps=3", "optim.lr=3e-3", "train.log_every=10"])
    steps = STEPS
    report = run(cfg)
    assert report["steps"] == steps
    _CACHE["run"] = {"run_dir": root / "run", "train": train, "test": test, "root": root}
    return _CACHE["run"]
