"""The demo path at a small budget: real Fashion-MNIST rows -> shards -> training -> zero-shot -> export -> reload."""
import gzip
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from pipeline.demo import FASHION_MNIST_DIR, main as demo

SOURCE = Path(FASHION_MNIST_DIR)


def write_subset(out: Path, num_train: int, num_test: int) -> None:
    """The first rows of each real split, re-written in the idx gz format the Debian package ships."""
    out.mkdir(parents=True)
    for split, n in (("train", num_train), ("t10k", num_test)):
        images = gzip.open(SOURCE / f"{split}-images-idx3-ubyte.gz").read()
        labels = gzip.open(SOURCE / f"{split}-labels-idx1-ubyte.gz").read()
        header = np.frombuffer(images[:16], ">i4").copy()
        header[1] = n
        with gzip.open(out / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header.tobytes() + images[16:16 + n * 28 * 28])
        with gzip.open(out / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([2049, n], ">i4").tobytes() + labels[8:8 + n])


@pytest.mark.skipif(not SOURCE.is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_demo_end_to_end_small(tmp_path):
    write_subset(tmp_path / "fm", num_train=1536, num_test=500)
    run_dir = tmp_path / "run"
    assert demo(["--run-dir", str(run_dir), "--fashion-mnist", str(tmp_path / "fm"), "--samples-per-shard", "512",
                 "--set", "train.steps=24", "--set", "data.batch_size=64", "--set", "optim.warmup_steps=4",
                 "--set", "train.log_every=4", "--set", "data.num_workers=0"]) == 0

    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 24 and report["samples_seen"] == 24 * 64
    assert 0.0 <= report["zero_shot_top1"] <= 1.0 and len(report["zero_shot_per_class"]) == 10
    assert (run_dir / "loss.png").stat().st_size > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0], "contrastive loss did not decrease"
    sizes = json.loads((run_dir / "shards" / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 1536

    # The export loads in plain open_clip, without plait, and gives normalised embeddings.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'export'}")
    tokens = open_clip.SimpleTokenizer(context_length=16)(["a photo of a sneaker"])
    with torch.no_grad():
        emb = model.encode_text(tokens, normalize=True)
    assert emb.shape == (1, 128) and torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert report["reload_max_abs_diff"] <= 1e-5
