"""`plait train` as a subprocess on real Fashion-MNIST shards: the shards fixture, arguments, spawning, metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.fmnist_fixture import spec, write_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("shards")
    return {"train": spec(write_shards(folder / "train", "train", 256, per_shard=64, fmt="jpg")),
            "test": spec(write_shards(folder / "test", "test", 64, per_shard=32, fmt="jpg"))}


def train_args(run_dir: Path, shards: dict, *overrides: str) -> list[str]:
    return ["--config", "tiny", "--set", f"data.train_shards={shards['train']}",
            "--set", f"train.run_dir={run_dir}", "--set", "data.batch_size=16", "--set", "train.log_every=1",
            *[a for o in overrides for a in ("--set", o)]]


def spawn(args: list[str], world_size: int = 1, rank: int = 0, port: int = 0,
          module: str = "pipeline.train.loop") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if world_size > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """The newest record of each step (a resumed segment rewrites the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind", "train") == kind:
            out[r["step"]] = r
    return out


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines() if x):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def finish(proc: subprocess.Popen, timeout_s: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, out
