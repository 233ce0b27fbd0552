"""s3:// end to end against a local S3 server (moto): `plait prep` writes a dataset into a bucket with 2 processes,
`plait prep verify` checks it there, and the training loader streams it with 2 workers, every sample once."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import open_clip

from data_prep.cli import main as prep
from pipeline.config import DataConfig
from pipeline.data.loader import TrainStream
from pipeline.train.distributed import World
from tests.helpers.prep_corpus import real_photos

from tests.helpers.s3_server import s3  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]


def test_prep_writes_verifies_and_the_loader_streams_an_s3_dataset(tmp_path, s3):
    photos = real_photos(30)
    table = tmp_path / "in.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows([p, f"photo {i}"] for i, p in enumerate(photos))
    # a fresh process, as a user runs it: the prep workers fork from a server that a process starts once, with
    # the environment of that moment (earlier tests in this process would have started it without the S3 settings)
    subprocess.run([sys.executable, "-m", "data_prep", "shard", "--input", str(table), "--output",
                    "s3://plait-test/ds", "--processes", "2", "--samples-per-shard", "10", "--image-size", "64",
                    "--no-progress", "--local-root", "/usr/share/doc/opencv-doc"], check=True, cwd=REPO)
    names = {p.rsplit("/", 1)[-1] for p in s3.ls("plait-test/ds")}
    assert {"00000.tar", "00001.tar", "00002.tar", "sizes.json", "manifest.json", "samples.parquet"} <= names
    assert not any(".tmp" in n for n in names)  # temp names renamed away on the object store too
    assert prep(["verify", "s3://plait-test/ds"]) == 0

    stream = TrainStream(DataConfig(train_shards="s3://plait-test/ds/{00000..00002}.tar", batch_size=5,
                                    num_workers=2), World(), open_clip.image_transform(32, is_train=True),
                         open_clip.get_tokenizer("ViT-B-32"), with_keys=True)
    batches = iter(stream)
    keys = [k for _ in range(stream.batches_per_epoch) for k in next(batches)["__key__"]]
    assert stream.num_samples == len(photos) and sorted(keys) == [f"{i:09d}" for i in range(len(photos))]
