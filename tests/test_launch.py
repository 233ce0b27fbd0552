"""launch/ without a cluster: rendered scripts (golden files, bash syntax, options), CLI errors,
the run-directory record, and the behaviour of the rendered train script's requeue logic.

Golden files live in tests/golden/; after a reviewed change to a template, regenerate them with
`PLAIT_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_launch.py` and review the diff.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import cli, render, slurm
from launch.local import local_command
from launch.spec import Container, PrepJob, Resources, TrainJob

GOLDEN = Path(__file__).resolve().parent / "golden"

GPU_2NODE_ARGV = [
    "train", "--run-dir", "/scratch/runs/vitb32", "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "64",
    "--partition", "gpu", "--account", "proj123", "--time", "2-00:00:00", "--qos", "high", "--constraint", "a100",
    "--exclusive", "--sbatch=--mail-type=END", "--setup", "module load cuda/12.4",
    "--setup", "source /scratch/venv/bin/activate", "--python", "python", "--signal-lead", "300",
    "--max-restarts", "5", "--dry-run", "--",
    "--config", "configs/vitb32.toml", "--set", "optim.lr=5e-4",
]


def _dry_run(argv, capsys) -> str:
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("PLAIT_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"rendered script differs from {path}; see this module's docstring"


def test_gpu_multinode_dry_run_matches_golden(capsys):
    _check_golden("train_gpu_2node.sbatch", _dry_run(GPU_2NODE_ARGV, capsys))


def test_gpu_multinode_apptainer_dry_run_matches_golden(capsys):
    argv = [a for a in GPU_2NODE_ARGV if a not in ("--python", "python")]
    argv[argv.index("--dry-run"):argv.index("--dry-run")] = [
        "--container", "/scratch/images/plait.sif", "--bind", "/scratch/data"]
    _check_golden("train_gpu_2node_apptainer.sbatch", _dry_run(argv, capsys))


def test_rendered_scripts_are_valid_bash(capsys, tmp_path):
    scripts = [_dry_run(GPU_2NODE_ARGV, capsys),
               _dry_run(["train", "--run-dir", str(tmp_path), "--cpu", "--nodes", "2", "--procs-per-node", "2",
                         "--no-requeue", "--dry-run", "--", "--config", "a b.toml"], capsys),
               _dry_run(["prep", "--run-dir", str(tmp_path), "--tasks", "8", "--throttle", "3",
                         "--container", "nvcr.io/team/plait:1", "--dry-run", "--", "--input", "x", "--output",
                         "/data/out"], capsys)]
    assert "data_prep.cli merge /data/out" in scripts[-1]
    for script in scripts:
        proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_train_script_launcher_per_node(tmp_path):
    job = TrainJob(run_dir=tmp_path, resources=Resources(nodes=2, procs_per_node=2, cpu=True),
                   train_args=("--config", "c.toml"), python="py")
    script = render.render_train(job)
    # torchrun on CPU, with a c10d rendezvous at the head node.
    assert "-m torch.distributed.run --nnodes 2 --nproc_per_node 2" in script
    assert '--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID"' in script
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '\n    trap \"\" USR1\n    exec py" in script
    assert "--gpus-per-node" not in script
    assert f"--set train.run_dir={tmp_path} --set train.device=cpu --resume auto" in script
    # accelerate on GPUs: --num_processes counts all nodes.
    gpu = render.render_train(TrainJob(run_dir=tmp_path, resources=Resources(nodes=4, procs_per_node=8),
                                       train_args=(), python="py"))
    assert "--num_machines 4 --num_processes 32 " in gpu and "#SBATCH --gpus-per-node=8" in gpu
    assert "train.device=cpu" not in gpu
    # A single process needs no launcher, so exit code 75 reaches the batch script unchanged.
    single = render.render_train(TrainJob(run_dir=tmp_path, resources=Resources(cpu=True), train_args=(),
                                          python="py"))
    assert "exec py \\\n        -m pipeline.train" in single and "torch.distributed" not in single


def test_user_resume_flag_is_kept_and_run_dir_is_owned_by_launcher(tmp_path):
    job = TrainJob(run_dir=tmp_path, resources=Resources(), train_args=("--resume", "none"))
    assert render.training_args(job).count("--resume") == 1
    with pytest.raises(ValueError, match="train.run_dir"):
        render.training_args(TrainJob(run_dir=tmp_path, resources=Resources(),
                                      train_args=("--set", "train.run_dir=/elsewhere")))


def test_container_wiring(tmp_path):
    res = Resources(nodes=2, procs_per_node=4)
    pyxis = render.render_train(TrainJob(run_dir=tmp_path, resources=res, train_args=(),
                                         container=Container("nvcr.io/x/plait:1", "pyxis")))
    assert f"--container-image=nvcr.io/x/plait:1 --container-mounts={tmp_path}:{tmp_path} bash -c '" in pyxis
    sif = render.render_train(TrainJob(run_dir=tmp_path, resources=res, train_args=(),
                                       container=Container("/img/plait.sif", "apptainer", ("/data",))))
    assert f"apptainer exec --nv --bind {tmp_path},/data /img/plait.sif bash -c '" in sif
    cpu = render.render_train(TrainJob(run_dir=tmp_path, resources=Resources(cpu=True, nodes=2), train_args=(),
                                       container=Container("/img/plait.sif", "apptainer")))
    assert "--nv" not in cpu
    assert Container.guess_runtime("/img/plait.sif") == "apptainer"
    assert Container.guess_runtime("docker://ghcr.io/x/plait:1") == "apptainer"
    assert Container.guess_runtime("nvcr.io#x/plait:1") == "pyxis"


def test_prep_scripts(tmp_path):
    job = PrepJob(run_dir=tmp_path, output_dir="/data/out", prep_args=("--input", "a.parquet"), num_tasks=10,
                  throttle=4, python="py")
    array = render.render_prep_array(job)
    assert "#SBATCH --array=0-9%4" in array
    assert 'py -m data_prep.cli shard --input a.parquet --task-index "$SLURM_ARRAY_TASK_ID" --num-tasks 10' in array
    assert "exec py -m data_prep.cli merge /data/out" in render.render_prep_merge(job)
    assert render.array_spec(10, 2, [3, 5]) == "3,5%2"
    with pytest.raises(ValueError, match="outside"):
        render.render_prep_array(job, [10])


@pytest.mark.parametrize("argv, message", [
    (["train", "--run-dir", "r", "--nodes", "0", "--dry-run"], "--nodes must be >= 1"),
    (["train", "--run-dir", "r", "--time", "two days", "--dry-run"], "--time 'two days'"),
    (["train", "--run-dir", "r", "--sbatch", "mail-type=END", "--dry-run"], "--sbatch 'mail-type=END'"),
    (["train", "--run-dir", "r", "--max-restarts", "-1", "--dry-run"], "--max-restarts"),
    (["prep", "--run-dir", "r", "--tasks", "0", "--output-dir", "o", "--dry-run"], "--tasks must be >= 1"),
    (["prep", "--run-dir", "r", "--tasks", "2", "--dry-run", "--", "--input", "x"], "--output DIR"),
    (["status", "/nonexistent/run"], "no job was submitted"),
])
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("plait: error: ") and message in err and err.count("\n") == 1


def test_job_record_roundtrip(tmp_path):
    slurm.append_record(tmp_path, slurm.JobRecord("prep-array", "12", "/x/prep.sbatch", 1.0))
    slurm.append_record(tmp_path, slurm.JobRecord("prep-merge", "13", "/x/merge.sbatch", 2.0))
    assert [r.job_id for r in slurm.read_records(tmp_path)] == ["12", "13"]


def test_local_command():
    assert local_command(1, ["--config", "c"], cpu=True, python="py") == [
        "py", "-m", "pipeline.train", "--config", "c", "--set", "train.device=cpu"]
    cmd = local_command(4, ["--config", "c"], cpu=False, python="py")
    assert cmd[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    with pytest.raises(ValueError, match="--nproc"):
        local_command(0, [], cpu=True)


# ---- the rendered script's control flow, run by bash with stand-ins for the SLURM tools ----

def _fake_tools(bin_dir: Path, train_body: str) -> None:
    """scontrol/scancel that log their calls, and an srun that runs the node command once, as node 0."""
    bin_dir.mkdir()
    log = bin_dir / "calls.log"
    tools = {
        "scontrol": f'echo "scontrol $*" >> {log}\n'
                    'case "$1 $2" in\n'
                    '  "show hostnames") echo n1; echo n2;;\n'
                    '  "show node") echo "NodeName=n1 Arch=x86_64 NodeAddr=10.0.0.1 NodeHostName=n1";;\n'
                    'esac\n',
        "scancel": f'echo "scancel $*" >> {log}\nkill -USR1 $(cat {bin_dir}/train.pid) 2>/dev/null\n',
        "srun": f'echo "srun $*" >> {log}\nSLURM_NODEID=0 exec "${{@: -3:2}}" "${{@: -1}}"\n',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
    # Python, like the real training: bash cannot trap a signal its parent ignored (the launcher
    # ignores USR1), but Python's signal.signal can, and so does pipeline.train.loop.
    (bin_dir / "train").write_text(
        f"#!{sys.executable}\nimport os, signal, sys, time\n"
        f"open({str(bin_dir / 'train.pid')!r}, 'w').write(str(os.getpid()))\n{train_body}")
    for path in bin_dir.iterdir():
        path.chmod(0o755)


def _run_rendered(tmp_path: Path, train_body: str, restart_count: int, signal_after_s: float | None):
    bin_dir = tmp_path / "bin"
    _fake_tools(bin_dir, train_body)
    job = TrainJob(run_dir=tmp_path, resources=Resources(nodes=2, procs_per_node=2, cpu=True), train_args=(),
                   python=str(bin_dir / "train"), max_restarts=2)
    script = tmp_path / "job.sbatch"
    # The stand-in `train` ignores the launcher flags; only the control flow is under test here.
    script.write_text(render.render_train(job).replace("-m torch.distributed.run", "#"))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n[1-2]",
               SLURM_RESTART_COUNT=str(restart_count))
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if signal_after_s is not None:
        # The trap is installed before the step starts: wait for the training stand-in, not a fixed time (a
        # loaded machine takes seconds to get there, and an untrapped USR1 kills bash).
        deadline = time.monotonic() + 60
        while not (bin_dir / "train.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(signal_after_s)
        proc.send_signal(10)  # SIGUSR1, as --signal=B:USR1@N delivers it to the batch shell
    out, _ = proc.communicate(timeout=30)
    calls = (bin_dir / "calls.log").read_text()
    return proc.returncode, out, calls


STOPPABLE_TRAINING = ("signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))\n"
                      "for _ in range(50):\n    time.sleep(0.1)\n")


def test_script_requeues_after_preemption_signal(tmp_path):
    rc, out, calls = _run_rendered(tmp_path, STOPPABLE_TRAINING, restart_count=0, signal_after_s=0.3)
    assert "scancel --signal=USR1 7" in calls
    assert "scontrol requeue 7" in calls, out
    assert rc == 0
    assert "rendezvous at 10.0.0.1:" in out  # the head node's NodeAddr, not its name


def test_script_does_not_requeue_a_finished_job(tmp_path):
    rc, out, calls = _run_rendered(tmp_path, "sys.exit(0)\n", restart_count=0, signal_after_s=None)
    assert rc == 0 and "scontrol requeue" not in calls and "training finished" in out


def test_script_does_not_requeue_a_failing_job(tmp_path):
    rc, out, calls = _run_rendered(tmp_path, "sys.exit(3)\n", restart_count=0, signal_after_s=None)
    assert rc == 3 and "scontrol requeue" not in calls and "failed with exit code 3" in out


def test_script_stops_requeueing_after_max_restarts(tmp_path):
    rc, out, calls = _run_rendered(tmp_path, STOPPABLE_TRAINING, restart_count=2, signal_after_s=0.3)
    assert rc == 75 and "scontrol requeue" not in calls and "restarts are used up" in out


def test_script_requeues_on_exit_75_without_signal(tmp_path):
    rc, _, calls = _run_rendered(tmp_path, "sys.exit(75)\n", restart_count=1, signal_after_s=None)
    assert rc == 0 and "scontrol requeue 7" in calls
    assert re.search(r"srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c", calls)
