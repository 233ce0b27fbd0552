"""Checkpoints and exports on object storage (train.remote_dir), against a local S3 server (moto): a run's
checkpoints are copied up and published last, pruned there too, found by `--resume auto` when the local run dir
is gone, survive a kill during upload, and `plait export` reads from and writes to the bucket."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import plait
from pipeline.train.remote_store import MARKER, RemoteCheckpoints
from tests.helpers.train_cli import finish, shards, spawn, train_args, wait_for_step  # noqa: F401 (a fixture)

from tests.helpers.s3_server import s3  # noqa: F401 (a fixture)
from tests.helpers.tolerance import assert_close

REPO = Path(__file__).resolve().parents[1]


def _fake_checkpoint(root: Path, step: int, big: int = 0) -> Path:
    """A folder with a checkpoint's file names (the store copies files; it does not read them)."""
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer.pt").write_bytes(b"t" * 100)
    (path / "rank-00000.pt").write_bytes(b"r" * 10)
    (path / "model.safetensors").write_bytes(os.urandom(big or 1000))
    return path


def test_published_last_pruned_and_fetched_with_sizes_checked(s3, tmp_path):
    store = RemoteCheckpoints("s3://plait-test/runs/r0")
    for step in (1, 2, 3):
        store.upload(_fake_checkpoint(tmp_path / "local", step))
        store.prune(2)
    assert store.complete() == ["step-00000002", "step-00000003"]
    assert not s3.exists("plait-test/runs/r0/checkpoints/step-00000001")
    # files without the listing (an upload cut short) are not a checkpoint, and are never deleted by prune
    s3.pipe_file("plait-test/runs/r0/checkpoints/step-00000009/trainer.pt", b"partial")
    assert store.latest() == "step-00000003"
    store.prune(1)
    assert s3.exists("plait-test/runs/r0/checkpoints/step-00000009/trainer.pt")
    got = store.download("step-00000003", tmp_path / "fetched")
    assert (got / "model.safetensors").read_bytes() == (tmp_path / "local/step-00000003/model.safetensors").read_bytes()
    # a file whose size differs from the listing is refused, and nothing is left half-fetched
    s3.pipe_file("plait-test/runs/r0/checkpoints/step-00000003/model.safetensors", b"short")
    with pytest.raises(ValueError, match=r"model.safetensors: 5 bytes, its listing says 1000"):
        store.download("step-00000003", tmp_path / "again")
    assert not any((tmp_path / "again").iterdir())


def test_a_kill_during_upload_leaves_no_checkpoint_there(s3, tmp_path):
    """A separate process uploads a checkpoint with a 64 MB model file and is killed with SIGKILL once the
    upload has begun: the step has files there but no listing, so it is not a checkpoint."""
    store = RemoteCheckpoints("s3://plait-test/runs/r1")
    store.upload(_fake_checkpoint(tmp_path / "local", 1))
    big = _fake_checkpoint(tmp_path / "local", 2, big=64 << 20)
    script = ("import sys; from pathlib import Path; from pipeline.train.remote_store import RemoteCheckpoints\n"
              "RemoteCheckpoints(sys.argv[1]).upload(Path(sys.argv[2]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "s3://plait-test/runs/r1", str(big)], cwd=REPO)
    deadline = time.monotonic() + 120
    while not s3.exists("plait-test/runs/r1/checkpoints/step-00000002/") and time.monotonic() < deadline:
        s3.invalidate_cache()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s3.invalidate_cache()
    assert not s3.exists(f"plait-test/runs/r1/checkpoints/step-00000002/{MARKER}")
    assert store.complete() == ["step-00000001"]


@pytest.mark.slow
def test_a_run_resumes_from_the_bucket_and_exports_there(s3, tmp_path, shards):
    remote = "s3://plait-test/runs/r2"
    run_dir = tmp_path / "run"
    args = train_args(run_dir, shards, "train.steps=40", "train.checkpoint_every=2", "train.keep_last=1",
                      f"train.remote_dir={remote}", "data.num_workers=0")
    proc = spawn(args)
    wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)  # preempted: a checkpoint at the stop step, then exit 75
    code, out = finish(proc)
    assert code == 75, out[-3000:]
    stopped = sorted((run_dir / "checkpoints").glob("step-*"))[-1].name
    store = RemoteCheckpoints(remote)
    assert store.complete() == [stopped] and stopped > "step-00000002"  # the older ones pruned there too
    listing = json.loads(s3.cat_file(f"plait-test/runs/r2/checkpoints/{stopped}/{MARKER}"))
    assert {"model.safetensors", "optimizer.pt", "trainer.pt", "rank-00000.pt"} <= set(listing["files"])

    # the node's disk is gone: --resume auto takes the bucket's newest checkpoint
    shutil.rmtree(run_dir)
    code, out = finish(spawn([*args, "--resume", "auto"]))
    assert code == 0, out[-3000:]
    assert f"{stopped} at step {int(stopped[5:])}" in out, out[-3000:]
    assert store.complete() == ["step-00000040"]

    # export reads the run from the bucket and writes the export there; a loader reads it back from there
    assert plait.main(["export", remote, "--format", "open_clip", "--out", "s3://plait-test/exports/e1"]) == 0
    names = {p.rsplit("/", 1)[-1] for p in s3.ls("plait-test/exports/e1")}
    assert {"open_clip_config.json", "open_clip_model.safetensors", ".plait-export", "README.md"} <= names
    assert ".plait-export-uploading" not in names
    from pipeline.artifacts.load import load_model
    from_bucket, from_disk = load_model("s3://plait-test/exports/e1"), load_model(run_dir)
    size = from_disk.model_cfg["vision_cfg"]["image_size"]
    images = torch.rand(2, 3, size, size)
    assert_close(from_bucket.model.encode_image(images), from_disk.model.encode_image(images), rtol=1e-4,
                 name="image embeddings")  # tolerance scaled to the values (tests/helpers/tolerance.py)
    # fine-tuning reads the export from the bucket and writes its own export there
    assert plait.main(["finetune", "s3://plait-test/exports/e1", "--train-data", shards["train"], "--test-data",
                       shards["test"], "--mode", "linear", "--epochs", "1", "--batch-size", "64",
                       "--out", "s3://plait-test/exports/ft1"]) == 0
    names = {p.rsplit("/", 1)[-1] for p in s3.ls("plait-test/exports/ft1")}
    assert {"open_clip_model.safetensors", "classifier.safetensors", ".plait-export"} <= names
    meta = json.loads(s3.cat_file("plait-test/exports/ft1/plait_metadata.json"))
    assert meta["finetune"]["from"] == "s3://plait-test/exports/e1"
    # an export never replaces a bucket folder it did not write
    s3.pipe_file("plait-test/exports/theirs/data.csv", b"a,b\n")
    assert plait.main(["export", remote, "--format", "open_clip", "--out", "s3://plait-test/exports/theirs"]) == 2
    assert s3.cat_file("plait-test/exports/theirs/data.csv") == b"a,b\n"
