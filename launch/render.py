"""Render sbatch scripts from the templates in launch/templates/.

Jinja2 (already a dependency of torch) keeps the scripts readable as bash
files with a few holes, instead of bash assembled from Python strings. Every
value that lands in a shell command goes through `shlex.quote` (the `q` filter).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import jinja2

from launch.spec import Container, PrepJob, TrainJob

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
EX_TEMPFAIL = 75
"""Training's exit code for "checkpointed after a signal, run me again"."""

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_env.filters["q"] = lambda value: shlex.quote(str(value))


def _join(args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def _has_flag(args: tuple[str, ...], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def training_args(job: TrainJob) -> list[str]:
    """The user's train args plus what the launcher owns: run dir, device, auto-resume."""
    args = list(job.train_args)
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--set" and i + 1 < len(args) else arg.removeprefix("--set=")
        if value.startswith("train.run_dir="):
            raise ValueError(f"train args set {value!r}: the launcher sets the run directory from --run-dir")
    args += ["--set", f"train.run_dir={job.run_dir}"]
    if job.resources.cpu:
        args += ["--set", "train.device=cpu"]
    # A requeued job runs this same command again and must pick up its checkpoint.
    if not _has_flag(job.train_args, "--resume"):
        args += ["--resume", "auto"]
    return args


def node_command(job: TrainJob) -> str:
    """The command each node's task runs; `$SLURM_NODEID` etc. expand inside the task."""
    res = job.resources
    python = shlex.quote(job.python)
    train = f"-m pipeline.train {_join(training_args(job))}"
    if res.world_size == 1:
        # No launcher in between, so training's exit code (75 = requeue me) reaches sbatch.
        parts = [python, train]
    elif job.resolved_launcher == "torchrun":
        # c10d rendezvous hosted by the head node's agent: node ranks come from the rendezvous, so no
        # per-node value has to reach the command line.
        parts = [f"{python} -m torch.distributed.run --nnodes {res.nodes} --nproc_per_node {res.procs_per_node}",
                 '--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID"',
                 train]
    else:
        # accelerate: --num_processes is the total over all nodes, --machine_rank this node's index.
        # Precision and compilation are training's config (Accelerator arguments win over these
        # launcher defaults); naming them only silences accelerate's "defaults used" warning.
        parts = [f"{python} -m accelerate.commands.launch --multi_gpu --num_machines {res.nodes}"
                 f" --num_processes {res.world_size} --mixed_precision no --dynamo_backend no",
                 '--machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"',
                 train]
    return " \\\n        ".join(parts)


def _binds(container: Container, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return list(dict.fromkeys([str(run_dir), *container.binds, *extra]))


def srun_container_options(container: Container | None, run_dir: Path, gpus: bool) -> str:
    """What goes between `srun` and the payload: pyxis options, or an `apptainer exec` prefix."""
    if container is None:
        return ""
    binds = _binds(container, run_dir)
    if container.runtime == "pyxis":
        mounts = ",".join(f"{b}:{b}" for b in binds)
        return f" --container-image={shlex.quote(container.image)} --container-mounts={shlex.quote(mounts)}"
    nv = " --nv" if gpus else ""
    return f" apptainer exec{nv} --bind {shlex.quote(','.join(binds))} {shlex.quote(container.image)}"


def command_prefix(container: Container | None, run_dir: Path, extra_binds: tuple[str, ...] = ()) -> str:
    """Prefix for a single-task command in a batch script (pyxis needs srun to enter the image)."""
    if container is None:
        return ""
    binds = _binds(container, run_dir, extra_binds)
    if container.runtime == "pyxis":
        mounts = ",".join(f"{b}:{b}" for b in binds)
        return f"srun --container-image={shlex.quote(container.image)} --container-mounts={shlex.quote(mounts)} "
    return f"apptainer exec --bind {shlex.quote(','.join(binds))} {shlex.quote(container.image)} "


def render_train(job: TrainJob) -> str:
    res = job.resources
    return _env.get_template("train.sbatch.j2").render(
        job=job,
        res=res,
        script_path=job.run_dir / "job.sbatch",
        node_script=shlex.quote(f'\n    trap "" USR1\n    exec {node_command(job)}\n'),
        srun_container=srun_container_options(job.container, job.run_dir, gpus=res.gpus_per_node > 0),
    )


def array_spec(num_tasks: int, throttle: int | None, task_ids: list[int] | None = None) -> str:
    """`0-9%4`, or a list of ids (`3,5`) when resubmitting failed tasks."""
    spec = ",".join(str(t) for t in task_ids) if task_ids else f"0-{num_tasks - 1}"
    return f"{spec}%{throttle}" if throttle else spec


def render_prep_array(job: PrepJob, task_ids: list[int] | None = None) -> str:
    for task_id in task_ids or []:
        if not 0 <= task_id < job.num_tasks:
            raise ValueError(f"task {task_id} is outside 0..{job.num_tasks - 1}")
    shard = f"{shlex.quote(job.python)} -m data_prep.cli shard {_join(job.prep_args)}"
    return _env.get_template("prep_array.sbatch.j2").render(
        job=job,
        res=job.resources,
        array_spec=array_spec(job.num_tasks, job.throttle, task_ids),
        shard_command=shard,
        command_prefix=command_prefix(job.container, job.run_dir, (job.output_dir,)),
    )


def render_prep_merge(job: PrepJob) -> str:
    merge = f"{shlex.quote(job.python)} -m data_prep.cli merge {shlex.quote(job.output_dir)}"
    return _env.get_template("prep_merge.sbatch.j2").render(
        job=job,
        res=job.resources,
        merge_command=merge,
        command_prefix=command_prefix(job.container, job.run_dir, (job.output_dir,)),
    )


def render_score_array(job: PrepJob, task_ids: list[int] | None = None) -> str:
    """`plait prep score` as a job array: task i scores the i-th of num_tasks contiguous shard ranges."""
    score = f"{shlex.quote(job.python)} -m data_prep.cli score {_join(job.prep_args)}"
    return _env.get_template("prep_array.sbatch.j2").render(
        job=job,
        res=job.resources,
        array_spec=array_spec(job.num_tasks, job.throttle, task_ids),
        shard_command=score,
        command_prefix=command_prefix(job.container, job.run_dir, (job.output_dir,)),
    )


def render_filter(job: PrepJob, filter_args: tuple[str, ...]) -> str:
    """`plait prep filter DATASET ...` after the scoring array (the dataset is job.output_dir)."""
    command = f"{shlex.quote(job.python)} -m data_prep.cli filter {shlex.quote(job.output_dir)} {_join(filter_args)}"
    return _env.get_template("filter.sbatch.j2").render(
        job=job,
        res=job.resources,
        filter_command=command,
        command_prefix=command_prefix(job.container, job.run_dir, (job.output_dir, *_outputs(filter_args))),
    )


def render_dedup_array(job: PrepJob, work: str, stage: str, task_ids: list[int] | None = None) -> str:
    """A stage of the near-duplicate search ("assign" or "units") as a job array over the prepared work folder
    `work`: task i runs the i-th of num_tasks contiguous ranges of its parts or units
    (`data_prep.curate.clusters.task_units`)."""
    if stage not in ("assign", "units"):
        raise ValueError(f"dedup stage {stage!r}: expected assign or units")
    command = f"{shlex.quote(job.python)} -m data_prep.curate.clusters {stage} {shlex.quote(work)} --no-progress"
    return _env.get_template("dedup_array.sbatch.j2").render(
        job=job,
        res=job.resources,
        stage=stage,
        array_spec=array_spec(job.num_tasks, job.throttle, task_ids),
        units_command=command,
        command_prefix=command_prefix(job.container, job.run_dir, (job.output_dir, work)),
    )


def _outputs(args: tuple[str, ...]) -> tuple[str, ...]:
    """Folders named by --output / --scores / --dedup-work in filter args (bound into a container)."""
    found = []
    for i, arg in enumerate(args):
        for flag in ("--output", "--scores", "--dedup-work"):
            if arg == flag and i + 1 < len(args):
                found.append(args[i + 1])
            elif arg.startswith(flag + "="):
                found.append(arg.split("=", 1)[1])
    return tuple(found)
