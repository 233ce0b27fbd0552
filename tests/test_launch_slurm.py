"""`plait launch` against a real single-machine SLURM cluster (munged, slurmctld, two slurmd).

The cluster is started once for this module under a temporary directory and stopped by PID
afterwards (tests/helpers/slurm_cluster.py). Without SLURM (and no way to install it) every test here
is skipped with the reason.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from launch import cli, slurm
from tests.helpers.tolerance import assert_close

from tests.helpers.slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster.start_or_skip(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env(cluster, monkeypatch):
    """Client commands find the test cluster; jobs (which inherit this environment) find the repo."""
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(REPO)
    return cluster


def _records(run_dir: Path, kind: str) -> list[str]:
    return [r.job_id for r in slurm.read_records(run_dir) if r.kind == kind]


def _wait_array(cluster: SlurmCluster, array_id: str, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = slurm.job_states(array_id)
        if states and all(s.split()[0] not in slurm.ACTIVE_STATES for s in states.values()):
            return states
        time.sleep(0.5)
    raise TimeoutError(f"array {array_id} still running: {states}\n{cluster.tail_logs()}")


def _log_tail(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("*.out")))


# ---- data prep: job array + merge, with a failed task resubmitted alone ----

def _image_folder(root: Path, num_images: int) -> Path:
    from PIL import Image

    root.mkdir()
    for i in range(num_images):
        # Distinct, deterministic pictures: a gradient whose direction and colour depend on i.
        image = Image.linear_gradient("L").resize((48 + i % 5, 40)).rotate(i * 23, expand=True)
        image = Image.merge("RGB", (image, image.point(lambda v: (v + 9 * i) % 256), image.transpose(0)))
        image.save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text(f"a test picture number {i}")
    return root


def _dataset_contents(out: Path) -> dict[str, bytes]:
    """Every file of a dataset folder, tars as their members, so two runs can be compared exactly."""
    contents = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(out))
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    contents[f"{rel}:{member.name}"] = tar.extractfile(member).read()
        else:
            contents[rel] = path.read_bytes()
    return contents


def _comparable(contents: dict[str, bytes]) -> dict:
    # Task markers say which split produced the shards, and the plan names its output folder:
    # both differ by construction (1 task vs 3, two folders). Everything else must be identical.
    kept: dict = {k: v for k, v in contents.items() if not k.startswith("_tasks/")}
    plan = json.loads(kept.pop("_plan.json"))
    plan.pop("output")
    kept["_plan.json"] = plan
    return kept


def test_prep_array_with_resubmitted_task_matches_local_run(slurm_env, tmp_path):
    cluster = slurm_env
    images = _image_folder(tmp_path / "images", 30)
    shard_args = ["--input", str(images), "--input-format", "folder", "--samples-per-shard", "5",
                  "--image-size", "32", "--processes", "1", "--no-progress"]

    local_out = tmp_path / "local"
    subprocess.run([sys.executable, "-m", "data_prep.cli", "shard", *shard_args, "--output", str(local_out)],
                   check=True, cwd=REPO, timeout=300)

    run_dir, slurm_out = tmp_path / "prep-run", tmp_path / "slurm"
    allow = tmp_path / "allow-task-1"
    # Task 1 fails on its first attempt (as after a node crash), until `allow` exists.
    fail_once = f'[ "${{SLURM_ARRAY_TASK_ID:-}}" != 1 ] || [ -e {allow} ] || {{ echo "task 1 fails"; exit 3; }}'
    assert cli.main(["prep", "--run-dir", str(run_dir), "--tasks", "3", "--throttle", "2",
                     "--setup", fail_once, "--", *shard_args, "--output", str(slurm_out)]) == 0
    (array_id,), (merge_id,) = _records(run_dir, "prep-array"), _records(run_dir, "prep-merge")
    assert "#SBATCH --array=0-2%2" in (run_dir / "prep.sbatch").read_text()

    states = _wait_array(cluster, array_id, 120)
    assert {k: v.split()[0] for k, v in states.items()} == {
        f"{array_id}_0": "COMPLETED", f"{array_id}_1": "FAILED", f"{array_id}_2": "COMPLETED"}, _log_tail(run_dir)
    merge = cluster.wait_job(merge_id, 60)
    assert merge["JobState"] == "CANCELLED", "the merge must not run after a failed task"
    assert not (slurm_out / "manifest.json").exists()

    allow.touch()
    assert cli.main(["resubmit", str(run_dir)]) == 0  # finds the failed task itself
    arrays, merges = _records(run_dir, "prep-array"), _records(run_dir, "prep-merge")
    assert len(arrays) == len(merges) == 2
    assert set(_wait_array(cluster, arrays[1], 120)) == {f"{arrays[1]}_1"}  # task 1 alone
    assert cluster.wait_job(merges[1], 120)["JobState"] == "COMPLETED", _log_tail(run_dir)

    local, sharded = _dataset_contents(local_out), _dataset_contents(slurm_out)
    assert sum(".tar:" in k and k.endswith(".txt") for k in local) == 30  # every picture made it in
    assert _comparable(sharded) == _comparable(local)


def test_hostile_run_and_dataset_dirs_stay_names(slurm_env, tmp_path):
    """Directory names with a space, `$(...)`, backquotes, `;`, quotes and `#`: sbatch writes the logs into the
    run dir named so (its `#SBATCH --output="..."` quoting), the array task and the merge run on the dataset dir
    named so, and nothing in either name runs."""
    cluster = slurm_env
    images = _image_folder(tmp_path / "images", 4)
    run_dir = tmp_path / "run dir $(touch PWNED) `touch PWNED`; 'q' #x"
    out = tmp_path / 'data "$(touch PWNED)" `touch PWNED`'
    assert cli.main(["prep", "--run-dir", str(run_dir), "--tasks", "1", "--", "--input", str(images),
                     "--input-format", "folder", "--samples-per-shard", "4", "--image-size", "32", "--processes", "1",
                     "--no-progress", "--output", str(out)]) == 0
    (array_id,), (merge_id,) = _records(run_dir, "prep-array"), _records(run_dir, "prep-merge")
    states = _wait_array(cluster, array_id, 120)
    assert [v.split()[0] for v in states.values()] == ["COMPLETED"], _log_tail(run_dir)
    assert cluster.wait_job(merge_id, 120)["JobState"] == "COMPLETED", _log_tail(run_dir)
    assert list(run_dir.glob("prep-*.out")) and list(run_dir.glob("merge-*.out"))
    assert json.loads((out / "manifest.json").read_text())
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()


def test_status_and_cancel(slurm_env, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # A job held in the queue: status must show it pending, cancel must remove it.
    assert cli.main(["train", "--run-dir", str(run_dir), "--cpu", "--sbatch=--hold", "--", "--config", "none"]) == 0
    (job_id,) = _records(run_dir, "train")
    capsys.readouterr()
    assert cli.main(["status", str(run_dir)]) == 0
    assert f"train       {job_id}" in capsys.readouterr().out and "PENDING" in slurm.job_states(job_id)[job_id]
    assert cli.main(["cancel", str(run_dir)]) == 0
    assert f"cancelled {job_id}" in capsys.readouterr().out
    assert slurm_env.wait_job(job_id, 30)["JobState"] == "CANCELLED"
    assert cli.main(["cancel", str(run_dir)]) == 0
    assert "nothing to cancel" in capsys.readouterr().out


# ---- training: 2 nodes x 2 CPU processes, and a preemption/requeue cycle ----

@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train-data")
    images = _image_folder(root / "images", 64)
    subprocess.run([sys.executable, "-m", "data_prep.cli", "shard", "--input", str(images), "--input-format",
                    "folder", "--samples-per-shard", "8", "--image-size", "32", "--processes", "1", "--no-progress",
                    "--output", str(root / "shards")], check=True, cwd=REPO, timeout=300)
    return f"{root}/shards/{{00000..00007}}.tar"


def _train_args(shards: str, steps: int) -> list[str]:
    # 64 samples, 4 processes x batch 4: 4 steps per epoch. Workers 0: two cores for four ranks.
    settings = {"data.train_shards": shards, "data.batch_size": 4, "data.num_workers": 0,
                "data.shuffle_buffer": 0, "optim.warmup_steps": 2, "train.steps": steps, "train.log_every": 1,
                "train.checkpoint_every": 0}
    return ["--config", "tiny",
            *[arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]]


def _final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints, f"no checkpoint in {run_dir}"
    return load_file(checkpoints[-1] / "model.safetensors")


def _metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind", "train") == "train"]


TRAIN_STEPS = 24  # 6 epochs: long enough to signal a running job mid-way


@pytest.fixture(scope="module")
def local_reference(train_shards, tmp_path_factory) -> Path:
    """The same training as a local 4-process run (torchrun), never interrupted."""
    run_dir = tmp_path_factory.mktemp("local-reference")
    started = time.monotonic()
    local = subprocess.run([sys.executable, "-m", "launch.cli", "local", "--nproc", "4", "--cpu", "--",
                            *_train_args(train_shards, TRAIN_STEPS), "--set", f"train.run_dir={run_dir}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    print(f"\nlocal 4-process run: {time.monotonic() - started:.1f}s")
    return run_dir


def _assert_same_training(run_dir: Path, reference: Path) -> None:
    remote_metrics, local_metrics = _metrics(run_dir), _metrics(reference)
    # Each step exactly once (a resumed run appends to metrics.jsonl), 16 samples per step = world size 4.
    assert [m["step"] for m in remote_metrics] == list(range(1, TRAIN_STEPS + 1))
    assert [m["samples_seen"] for m in remote_metrics] == [16 * s for s in range(1, TRAIN_STEPS + 1)]
    assert [m["loss"] for m in remote_metrics] == pytest.approx([m["loss"] for m in local_metrics], rel=1e-4)
    # The per-step losses above show every step saw the same batch as the reference. The weights agree
    # to float noise (measured: at most 4e-6 after a resume, on parameters of magnitude 1e-2). Adam moves
    # each parameter by about the LR (1e-3 early on) per step, so a different batch shows far above 2e-5.
    remote, here = _final_weights(run_dir), _final_weights(reference)
    assert remote.keys() == here.keys()
    for name in here:
        assert_close(remote[name], here[name], rtol=1e-4, scale_rtol=1e-3, name=name)


@pytest.mark.slow
@pytest.mark.dist
def test_two_node_training_matches_local_four_process_run(slurm_env, train_shards, local_reference, tmp_path):
    run_dir = tmp_path / "slurm"
    started = time.monotonic()
    assert cli.main(["train", "--run-dir", str(run_dir), "--nodes", "2", "--procs-per-node", "2", "--cpu",
                     "--", *_train_args(train_shards, TRAIN_STEPS)]) == 0
    (job_id,) = _records(run_dir, "train")
    job = slurm_env.wait_job(job_id, 300)
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", log[-5000:]
    print(f"\n2-node job: {time.monotonic() - started:.1f}s from submission to completion")

    assert job["NodeList"] == "n[1-2]" and "training finished" in log
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.name for p in ckpt.glob("rank-*.pt")) == [f"rank-{r:05d}.pt" for r in range(4)]
    _assert_same_training(run_dir, local_reference)


@pytest.mark.slow
@pytest.mark.dist
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_env, train_shards, local_reference, tmp_path):
    """USR1 to the batch script (what --signal=B:USR1@N sends) -> checkpoint -> requeue -> resume -> done,
    with the same steps, samples and final weights as the uninterrupted run."""
    cluster, run_dir = slurm_env, tmp_path / "slurm"
    # accelerate here, torchrun (the CPU default) in the 2-node test: both launchers run on the cluster.
    assert cli.main(["train", "--run-dir", str(run_dir), "--nodes", "2", "--procs-per-node", "2", "--cpu",
                     "--launcher", "accelerate", "--max-restarts", "2", "--", *_train_args(train_shards, TRAIN_STEPS)]) == 0
    (job_id,) = _records(run_dir, "train")
    assert "#SBATCH --signal=B:USR1@120" in (run_dir / "job.sbatch").read_text()

    # Signal once training is under way (the handlers are installed) and well before its end.
    metrics_path, deadline = run_dir / "metrics.jsonl", time.monotonic() + 240
    while not (metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, f"training never started: {_log_tail(run_dir)}"
        assert cluster.job_state(job_id).get("JobState") in ("PENDING", "RUNNING"), _log_tail(run_dir)
        time.sleep(0.2)
    signalled = time.monotonic()
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    job = cluster.wait_job(job_id, 300)
    done = time.monotonic()
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log[-6000:]
    stopped = re.search(r"stopping at step (\d+) \(signal\); checkpoint saved", log)
    assert stopped, log[-6000:]
    stop_step = int(stopped.group(1))
    assert 2 <= stop_step < TRAIN_STEPS
    assert "requeueing (restart 1/2)" in log and "start 1/2 restarts" in log
    assert re.search(rf"resumed from \S+step-{stop_step:08d} at step {stop_step}", log), log[-6000:]
    assert log.count("training finished") == 1
    print(f"\nrequeue cycle: stopped at step {stop_step}/{TRAIN_STEPS}; {done - signalled:.1f}s from the signal "
          "to completion")
    _assert_same_training(run_dir, local_reference)


def _signal_when(cluster: SlurmCluster, run_dir: Path, job_id: str, lines: int) -> None:
    """USR1 to the batch script once metrics.jsonl holds `lines` records (training under way)."""
    metrics_path, deadline = run_dir / "metrics.jsonl", time.monotonic() + 240
    while not (metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= lines):
        assert time.monotonic() < deadline, f"training never got there: {_log_tail(run_dir)}"
        assert cluster.job_state(job_id).get("JobState") in ("PENDING", "RUNNING"), _log_tail(run_dir)
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)


@pytest.mark.slow
@pytest.mark.dist
def test_a_preempted_two_node_job_resumes_on_one_node_then_on_two(slurm_env, train_shards, tmp_path):
    """Preempted on 2 nodes x 2 processes, resubmitted on 1 node (2 processes: accumulation 2 keeps the global
    batch of 16), preempted again, resubmitted on 2 nodes to the end: every step once, 16 samples each."""
    cluster, run_dir = slurm_env, tmp_path / "slurm"
    common = ["--procs-per-node", "2", "--cpu", "--max-restarts", "0", "--", *_train_args(train_shards, TRAIN_STEPS)]
    logs = []
    for nodes, lines in ((2, 2), (1, None), (2, None)):
        before = len(_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        assert cli.main(["train", "--run-dir", str(run_dir), "--nodes", str(nodes), *common]) == 0
        job_id = _records(run_dir, "train")[-1]
        if len(logs) < 2:
            _signal_when(cluster, run_dir, job_id, lines or before + 3)
        cluster.wait_job(job_id, 300)
        logs.append((run_dir / f"slurm-{job_id}.out").read_text())
    assert "stopping at step" in logs[0] and "stopping at step" in logs[1], logs[1][-4000:]
    assert "resuming on 2 processes (the checkpoint ran on 4): global batch 16 kept with data.batch_size 4 x " \
           "train.accum_steps 2" in logs[1], logs[1][-4000:]
    assert "resuming on 4 processes (the checkpoint ran on 2)" in logs[2], logs[2][-4000:]
    assert logs[2].count("training finished") == 1, logs[2][-4000:]
    records = _metrics(run_dir)
    assert [m["step"] for m in records] == list(range(1, TRAIN_STEPS + 1))
    assert [m["samples_seen"] for m in records] == [16 * s for s in range(1, TRAIN_STEPS + 1)]
