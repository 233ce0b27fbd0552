"""What a SLURM job asks for, as plain values validated once.

`Resources` is the allocation (the `#SBATCH` header); `Container` says how the
payload runs inside an image; `TrainJob` / `PrepJob` add what each kind of job
runs. The renderer turns them into scripts; nothing here touches SLURM.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHERS = ("accelerate", "torchrun")
CONTAINER_RUNTIMES = ("apptainer", "pyxis")
# sbatch accepts minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^UNLIMITED$|^INFINITE$")
_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class Resources:
    """The allocation one job asks for."""

    nodes: int = 1
    """Number of nodes."""
    procs_per_node: int = 1
    """Training processes per node: one per GPU, or CPU processes with `cpu`."""
    cpu: bool = False
    """No GPUs: request none and train with `train.device=cpu` (clusters without GPUs, tests)."""
    cpus_per_task: int | None = None
    """CPU cores for each node's launcher task (shared by that node's processes)."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Wall-clock limit in any format sbatch accepts, e.g. `2-00:00:00`."""
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    """Ask for whole nodes."""
    extra_sbatch: tuple[str, ...] = ()
    """Further `#SBATCH` options, verbatim (e.g. `--mail-type=END`)."""
    setup: tuple[str, ...] = ()
    """Shell lines run before the payload (module loads, venv activation)."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.procs_per_node < 1:
            raise ValueError(f"--procs-per-node must be >= 1, got {self.procs_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if self.time is not None and not _TIME_RE.match(self.time):
            raise ValueError(f"--time {self.time!r} is not a SLURM time (e.g. 90, 12:00:00, 2-00:00:00)")
        for line in self.extra_sbatch:
            if not line.startswith("-") or "\n" in line:
                raise ValueError(f"--sbatch {line!r} must be one option starting with '-', e.g. --mail-type=END")
        for line in self.setup:
            if "\n" in line:
                raise ValueError(f"--setup {line!r}: give one line per --setup")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def gpus_per_node(self) -> int:
        return 0 if self.cpu else self.procs_per_node


@dataclass(frozen=True)
class Container:
    """Run the payload inside an image on the compute nodes."""

    image: str
    runtime: str
    """`apptainer` (`apptainer exec --nv IMAGE`) or `pyxis` (`srun --container-image=IMAGE`)."""
    binds: tuple[str, ...] = ()
    """Host paths visible inside the container (the run directory is always bound)."""

    def __post_init__(self) -> None:
        if self.runtime not in CONTAINER_RUNTIMES:
            raise ValueError(f"--container-runtime {self.runtime!r}: choose one of {', '.join(CONTAINER_RUNTIMES)}")
        if not self.image:
            raise ValueError("--container needs an image")

    @staticmethod
    def guess_runtime(image: str) -> str:
        """A `.sif` file or an apptainer URI runs under apptainer; anything else is a registry image for pyxis."""
        if image.endswith(".sif") or image.split("://")[0] in ("docker", "oras", "library", "shub"):
            return "apptainer"
        return "pyxis"


@dataclass(frozen=True)
class TrainJob:
    """A (multi-node) training job that requeues itself on preemption."""

    run_dir: Path
    resources: Resources
    train_args: tuple[str, ...]
    """Arguments for `python -m pipeline.train`, as the user gave them after `--`."""
    job_name: str = "plait-train"
    launcher: str | None = None
    """`accelerate` or `torchrun`; default accelerate on GPUs, torchrun on CPUs (accelerate's --cpu is single-process)."""
    python: str = "python3"
    """Interpreter on the compute nodes (inside the container when there is one)."""
    requeue: bool = True
    """On the preemption signal: checkpoint, then requeue the same job."""
    signal_lead_s: int = 120
    """Seconds before the time limit at which SLURM sends USR1 to the batch script."""
    max_restarts: int = 3
    """Requeue at most this many times (SLURM_RESTART_COUNT), so a job that keeps dying cannot loop."""
    container: Container | None = None

    def __post_init__(self) -> None:
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher {self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
        if not _JOB_NAME_RE.match(self.job_name):
            raise ValueError(f"--job-name {self.job_name!r}: use letters, digits and ._+-")
        if self.signal_lead_s < 1:
            raise ValueError(f"--signal-lead must be >= 1 second, got {self.signal_lead_s}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")

    @property
    def resolved_launcher(self) -> str:
        if self.launcher:
            return self.launcher
        return "torchrun" if self.resources.cpu else "accelerate"


@dataclass(frozen=True)
class PrepJob:
    """Data prep as an array of shard tasks plus one merge job."""

    run_dir: Path
    output_dir: str
    """The dataset directory the shard tasks write into and the merge job finalizes."""
    prep_args: tuple[str, ...]
    """Arguments for `python -m data_prep.cli shard`, as given after `--`."""
    num_tasks: int
    throttle: int | None = None
    """At most this many array tasks run at once (the `%` in `--array`)."""
    resources: Resources = field(default_factory=Resources)
    job_name: str = "plait-prep"
    python: str = "python3"
    container: Container | None = None

    def __post_init__(self) -> None:
        if self.num_tasks < 1:
            raise ValueError(f"--tasks must be >= 1, got {self.num_tasks}")
        if self.throttle is not None and self.throttle < 1:
            raise ValueError(f"--throttle must be >= 1, got {self.throttle}")
        if not _JOB_NAME_RE.match(self.job_name):
            raise ValueError(f"--job-name {self.job_name!r}: use letters, digits and ._+-")
        if self.resources.nodes != 1 or self.resources.procs_per_node != 1:
            raise ValueError("prep array tasks are single-process: --nodes/--procs-per-node do not apply")
