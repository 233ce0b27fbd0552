"""Every value rendered into a job script is validated or quoted: each template is rendered with hostile values in
every field and run by bash under stand-in SLURM tools; nothing but the intended command runs, and it receives the
values byte for byte. Values that cannot be written safely (a newline anywhere, shell syntax in an #SBATCH value,
`"`, `\\` or `%` in a log path) are refused with a one-line error naming the flag."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli, render
from launch.spec import Container, PrepJob, Resources, TrainJob

MARK = "PWNED"
# Shell syntax that would run `touch PWNED` if pasted unquoted anywhere: substitution, backquotes, a closed quote,
# a command separator, a comment, a newline.
HOSTILE = f"x $(touch {MARK}) `touch {MARK}` \"; touch {MARK}; echo \"' ; touch {MARK} #"
HOSTILE_LINE = HOSTILE + f"\ntouch {MARK}"
# What a run directory may hold: everything above but `"` (sbatch's own quoting) and newlines.
HOSTILE_DIR = f"run $(touch {MARK}) `touch {MARK}`; touch {MARK} & ' #x"


def _stubs(bin_dir: Path) -> Path:
    """srun / apptainer run their payload; scontrol answers like a one-node cluster; sbatch, scancel log. The
    interpreter (a file whose very name is hostile) records its argv."""
    bin_dir.mkdir()
    log = bin_dir / "calls.jsonl"
    record = (f"#!{sys.executable}\nimport json, sys\n"
              f"open({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n")
    tools = {
        "srun": record + "import os\nargs = sys.argv[1:]\nwhile args[0].startswith('-'):\n    args.pop(0)\n"
                         "os.execvp(args[0], args)\n",
        "apptainer": record + "import os\nargs = sys.argv[2:]\nwhile args[0].startswith('-'):\n"
                              "    args = args[2:] if args[0] == '--bind' else args[1:]\n"
                              "os.execvp(args[1], args[1:])\n",
        "scontrol": record + "if sys.argv[1:3] == ['show', 'hostnames']: print('n1')\n"
                             "if sys.argv[1:3] == ['show', 'node']: print('NodeName=n1 NodeAddr=127.0.0.1 x=y')\n",
        "scancel": record, "sbatch": record + "print(7)\n",
        HOSTILE_DIR.replace("/", "_"): record,  # the interpreter
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir / HOSTILE_DIR.replace("/", "_")


def _run(script: str, tmp_path: Path, bin_dir: Path) -> list[list[str]]:
    """Runs `script` with bash in a fresh folder; returns every stand-in's argv. Fails if PWNED appeared."""
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    path = work / "job.sbatch"
    path.write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_ARRAY_TASK_ID="0",
               SLURM_JOB_NODELIST="n1", SLURM_RESTART_COUNT="0", SLURM_NODEID="0")
    proc = subprocess.run(["bash", str(path)], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert not list(tmp_path.rglob(MARK)), f"a hostile value ran as code:\n{script}"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = bin_dir / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return calls


def _payload(calls: list[list[str]], module: str) -> list[str]:
    """The arguments the interpreter (not srun or apptainer on its way) got after `-m MODULE`."""
    (argv,) = [c for c in calls if c[0].endswith(HOSTILE_DIR) and module in c]
    return argv[argv.index(module) + 1:]


@pytest.fixture
def hostile(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    python = _stubs(bin_dir)
    run_dir = tmp_path / HOSTILE_DIR
    run_dir.mkdir()
    return {"bin": bin_dir, "python": str(python), "run_dir": run_dir}


RESOURCES = dict(partition="gpu-a100", account="proj_1", qos="high", constraint="a100&ib|[rack1*2]", time="10",
                 extra_sbatch=(f"--comment={HOSTILE}",), cpus_per_task=2)


@pytest.mark.parametrize("nodes, container", [(1, None), (2, None), (2, "apptainer")])
def test_train_script_with_hostile_values_runs_only_training(tmp_path, hostile, nodes, container):
    args = ("--config", HOSTILE, "--set", f"data.train_shards={HOSTILE_LINE}", HOSTILE_LINE)
    box = Container(f"/img/{HOSTILE}.sif", "apptainer", (HOSTILE,)) if container else None
    job = TrainJob(run_dir=hostile["run_dir"], resources=Resources(nodes=nodes, procs_per_node=2, cpu=True,
                                                                   **RESOURCES),
                   train_args=args, python=hostile["python"], container=box)
    script = render.render_train(job)
    assert f'#SBATCH --output="{hostile["run_dir"]}/slurm-%j.out"' in script
    calls = _run(script, tmp_path, hostile["bin"])
    assert _payload(calls, "pipeline.train") == render.training_args(job)


def test_prep_and_score_scripts_with_hostile_values_run_only_their_commands(tmp_path, hostile):
    prep_args = ("--input", HOSTILE_LINE, "--output", HOSTILE)
    job = PrepJob(run_dir=hostile["run_dir"], output_dir=HOSTILE, prep_args=prep_args, num_tasks=3,
                  python=hostile["python"], resources=Resources(**RESOURCES))
    shard = _payload(_run(render.render_prep_array(job), tmp_path, hostile["bin"]), "data_prep.cli")
    assert shard == ["shard", *prep_args, "--task-index", "0", "--num-tasks", "3"]
    merge = render.render_prep_merge(job)
    assert _payload(_run(merge, tmp_path, hostile["bin"]), "data_prep.cli") == ["merge", HOSTILE]
    score = _payload(_run(render.render_score_array(job), tmp_path, hostile["bin"]), "data_prep.cli")
    assert score[0] == "score" and score[1:4] == list(prep_args[:3])
    filter_args = ("--min-score", HOSTILE_LINE)
    filtered = _payload(_run(render.render_filter(job, filter_args), tmp_path, hostile["bin"]), "data_prep.cli")
    assert filtered == ["filter", HOSTILE, *filter_args]
    boxed = PrepJob(run_dir=hostile["run_dir"], output_dir=HOSTILE, prep_args=prep_args, num_tasks=3,
                    python=hostile["python"], container=Container(f"/img/{HOSTILE}.sif", "apptainer", (HOSTILE,)))
    assert _payload(_run(render.render_prep_merge(boxed), tmp_path, hostile["bin"]), "data_prep.cli") == [
        "merge", HOSTILE]


@pytest.mark.parametrize("field, value, flag", [
    ("partition", "gpu\ntouch PWNED", "--partition"),
    ("account", "a\r\ntouch PWNED", "--account"),
    ("qos", "high $(touch PWNED)", "--qos"),
    ("constraint", "a100\ntouch PWNED", "--constraint"),
    ("constraint", 'a100" --wrap="touch PWNED', "--constraint"),
    ("partition", "gpu#x", "--partition"),
    ("extra_sbatch", ("--comment=a\ntouch PWNED",), "--sbatch"),
    ("setup", ("module load x\ntouch PWNED",), "--setup"),
])
def test_unsafe_sbatch_values_are_refused_naming_the_flag(field, value, flag):
    with pytest.raises(ValueError) as err:
        Resources(**{field: value})
    message = str(err.value)
    assert message.startswith(flag) and "\n" not in message.replace(repr(value), "")


@pytest.mark.parametrize("run_dir", ["/scratch/a\ntouch PWNED", '/scratch/a"b', "/scratch/50%", "/scratch/a\\b"])
def test_run_dirs_that_cannot_be_a_log_path_are_refused(run_dir):
    for make in (lambda: TrainJob(run_dir=Path(run_dir), resources=Resources(), train_args=()),
                 lambda: PrepJob(run_dir=Path(run_dir), output_dir="o", prep_args=(), num_tasks=1)):
        with pytest.raises(ValueError, match="^--run-dir "):
            make()


def test_newlines_in_other_values_are_refused():
    with pytest.raises(ValueError, match="^--output "):
        PrepJob(run_dir=Path("/r"), output_dir="o\ntouch PWNED", prep_args=(), num_tasks=1)
    with pytest.raises(ValueError, match="^--python "):
        TrainJob(run_dir=Path("/r"), resources=Resources(), train_args=(), python="py\ntouch PWNED")
    with pytest.raises(ValueError, match="^--bind "):
        Container("/img.sif", "apptainer", ("/data\ntouch PWNED",))


def test_cli_reports_a_hostile_partition_as_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--run-dir", "r", "--partition", "gpu\ntouch PWNED", "--dry-run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("plait: error: --partition ") and err.count("\n") == 1
