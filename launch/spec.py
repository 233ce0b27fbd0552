"""What a SLURM job asks for, as plain values validated once.

`Resources` is the allocation (the `#SBATCH` header); `Container` says how the
payload runs inside an image; `TrainJob` / `PrepJob` add what each kind of job
runs. The renderer turns them into scripts; nothing here touches SLURM.

Every string that reaches a script is checked here, once: no control characters anywhere (a newline in a value
would start a new script line, even inside an `#SBATCH` comment); `#SBATCH` values limited to the characters
SLURM names and constraint expressions use; paths in `#SBATCH --output` free of what sbatch's own quoting and
SLURM's filename patterns interpret (`"`, `\\`, `%`). Wherever a value is used in a shell command, the renderer
shell-quotes it as well.
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
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Partition/account/QOS names and constraint expressions (`a100&ib`, `[rack1|rack2]`, `gpu*2`): nothing sbatch's
# #SBATCH parser or the shell would interpret (whitespace, quotes, `#`, `$`, backquotes, `;`, `<>`).
_SBATCH_VALUE_RE = re.compile(r"^[A-Za-z0-9_.,:@+=!&|*()\[\]/-]+$")
_OUTPUT_PATH_UNSAFE = ('"', "\\", "%")


def check_line(flag: str, value: str) -> str:
    """`value` when it holds no control character (newline, carriage return, NUL, ...); else ValueError."""
    if _CONTROL_RE.search(str(value)):
        raise ValueError(f"{flag} {str(value)!r}: control characters such as newlines are not allowed (a newline "
                         f"would start a new line of the job script)")
    return value


def check_sbatch_value(flag: str, value: str | None) -> None:
    """A value written after `#SBATCH --option=`: letters, digits and `_.,:@+=!&|*()[]/-` only."""
    if value is not None and not _SBATCH_VALUE_RE.match(check_line(flag, value)):
        raise ValueError(f"{flag} {value!r}: use letters, digits and _.,:@+=!&|*()[]/- (no spaces, quotes, "
                         f"'#' or '$')")


def check_output_dir(flag: str, path: Path) -> None:
    """A directory that `#SBATCH --output="DIR/..."` names: sbatch's quoting and SLURM's `%` patterns must not
    see anything they interpret. Spaces are fine (the value is double-quoted)."""
    check_line(flag, str(path))
    bad = [c for c in _OUTPUT_PATH_UNSAFE if c in str(path)]
    if bad:
        raise ValueError(f"{flag} {str(path)!r}: {' '.join(bad)} cannot appear in a SLURM log path; "
                         f"choose a directory name without them")


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
        for flag in ("partition", "account", "qos", "constraint"):
            check_sbatch_value(f"--{flag}", getattr(self, flag))
        for line in self.extra_sbatch:
            check_line("--sbatch", line)
            if not line.startswith("-"):
                raise ValueError(f"--sbatch {line!r} must be one option starting with '-', e.g. --mail-type=END")
        for line in self.setup:
            if "\n" in line:
                raise ValueError(f"--setup {line!r}: give one line per --setup")
            check_line("--setup", line)

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
        check_line("--container", self.image)
        for path in self.binds:
            check_line("--bind", path)

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
        check_output_dir("--run-dir", self.run_dir)
        check_line("--python", self.python)

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
        check_output_dir("--run-dir", self.run_dir)
        check_line("--output", self.output_dir)
        check_line("--python", self.python)
