"""What the SLURM launcher costs, on the real single-machine test cluster.

1. The same CPU training (4 processes) run locally with torchrun (`plait launch local`) and as a
   2-node x 2-process SLURM job (`plait launch train`): wall time from start to finish and the ratio,
   i.e. the overhead of sbatch + srun + one launcher per node + rendezvous.
2. A preemption cycle: USR1 to the batch script -> checkpoint -> requeue -> resume, split into the
   time to stop, the time in the queue, and the time until the resumed run logs its first step.

Usage: .venv/bin/python benchmarks/bench_launch.py [--steps 40]   (needs root; installs SLURM if missing)
On a 2-core machine the 4 training processes share two cores: the figures are for the launcher's
overhead, not for training speed.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from tests.helpers.slurm_cluster import SlurmCluster, unavailable_reason  # noqa: E402

from launch import slurm  # noqa: E402


def make_shards(root: Path, num_images: int) -> str:
    from PIL import Image

    images = root / "images"
    images.mkdir()
    for i in range(num_images):
        image = Image.linear_gradient("L").resize((48 + i % 5, 40)).rotate(i * 23, expand=True)
        Image.merge("RGB", (image, image.transpose(0), image)).save(images / f"{i:04d}.png")
        (images / f"{i:04d}.txt").write_text(f"picture {i}")
    subprocess.run([sys.executable, "-m", "data_prep.cli", "shard", "--input", str(images), "--input-format",
                    "folder", "--samples-per-shard", "8", "--image-size", "32", "--processes", "1",
                    "--no-progress", "--output", str(root / "shards")], check=True, cwd=REPO)
    return f"{root}/shards/{{00000..{num_images // 8 - 1:05d}}}.tar"


def train_args(shards: str, steps: int) -> list[str]:
    settings = {"data.train_shards": shards, "data.batch_size": 4, "data.num_workers": 0,
                "data.shuffle_buffer": 0, "train.steps": steps, "train.log_every": 1, "train.checkpoint_every": 0}
    return ["--config", "tiny",
            *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]]


def submit(run_dir: Path, args: list[str], env: dict) -> str:
    subprocess.run([sys.executable, "-m", "launch.cli", "train", "--run-dir", str(run_dir), "--nodes", "2",
                    "--procs-per-node", "2", "--cpu", "--", *args], check=True, cwd=REPO, env=env,
                   capture_output=True)
    return slurm.read_records(run_dir)[-1].job_id


def stamp(log: str, pattern: str) -> float:
    match = re.search(pattern + r".* at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d)", log, re.M)
    assert match, f"no line matching {pattern!r} in the job log"
    return datetime.fromisoformat(match.group(1)).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    steps = parser.parse_args().steps
    reason = unavailable_reason()
    if reason:
        print(f"bench_launch: {reason}")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        root = Path(tmp)
        shards = make_shards(root, 64)
        cluster = SlurmCluster(root / "cluster")
        cluster.start()
        env = dict(cluster.env, PYTHONPATH=str(REPO))
        try:
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "launch.cli", "local", "--nproc", "4", "--cpu", "--",
                            *train_args(shards, steps), "--set", f"train.run_dir={root / 'local'}"],
                           check=True, cwd=REPO, capture_output=True)
            local_s = time.monotonic() - started

            started = time.monotonic()
            job_id = submit(root / "slurm", train_args(shards, steps), env)
            job = cluster.wait_job(job_id, 900)
            slurm_s = time.monotonic() - started
            assert job["JobState"] == "COMPLETED", job
            print(f"{steps} steps, 4 CPU processes: local torchrun {local_s:.1f}s, "
                  f"SLURM 2 nodes x 2 {slurm_s:.1f}s, ratio {slurm_s / local_s:.2f}")

            run_dir = root / "requeue"
            started = time.monotonic()
            job_id = submit(run_dir, train_args(shards, steps), env)
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
                time.sleep(0.2)
            cluster.run("scancel", "--batch", "--signal=USR1", job_id)
            job = cluster.wait_job(job_id, 900)
            requeued_s = time.monotonic() - started
            log = (run_dir / f"slurm-{job_id}.out").read_text()
            assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
            signal_t, restart_t = stamp(log, r"^plait: USR1"), stamp(log, r"^plait: job \d+ start 1/")
            finished_t = stamp(log, r"^plait: training finished")
            stop_step = re.search(r"resumed from \S+ at step (\d+)", log).group(1)
            print(f"requeue cycle (stopped at step {stop_step}/{steps}): signal -> restarted job "
                  f"{restart_t - signal_t:.1f}s (checkpoint, exit, requeue, scheduling), restart -> done "
                  f"{finished_t - restart_t:.1f}s; whole preempted job {requeued_s:.1f}s vs "
                  f"{slurm_s:.1f}s uninterrupted, ratio {requeued_s / slurm_s:.2f}")
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
