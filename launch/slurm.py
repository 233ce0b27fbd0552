"""Talk to SLURM (sbatch, squeue, scontrol, scancel) and keep the run directory's job record.

The record, `RUN_DIR/jobs.json`, lists every job submitted for the run (kind,
id, script, time) so `status` and `cancel` work from the run directory alone,
and a resubmission of failed array tasks knows which array it replaces.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RECORD_NAME = "jobs.json"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED"}


@dataclass(frozen=True)
class JobRecord:
    kind: str
    """`train`, `prep-array` or `prep-merge`."""
    job_id: str
    script: str
    submitted_at: float


def _run(cmd: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(f"{cmd[0]} not found: run this on a SLURM login node (or set PATH)")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def sbatch(script: Path, *options: str) -> str:
    """Submit `script`; return the job id (`--parsable` prints `id[;cluster]`)."""
    proc = _run(["sbatch", "--parsable", *options, str(script)])
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def read_records(run_dir: Path) -> list[JobRecord]:
    path = Path(run_dir) / RECORD_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: no job was submitted for run directory {run_dir}")
    return [JobRecord(**entry) for entry in json.loads(path.read_text())]


def append_record(run_dir: Path, record: JobRecord) -> None:
    path = Path(run_dir) / RECORD_NAME
    records = [asdict(r) for r in read_records(run_dir)] if path.exists() else []
    records.append(asdict(record))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    tmp.rename(path)


def submit(run_dir: Path, kind: str, script: Path, *options: str) -> str:
    job_id = sbatch(script, *options)
    append_record(run_dir, JobRecord(kind=kind, job_id=job_id, script=str(script), submitted_at=time.time()))
    return job_id


def job_states(job_id: str) -> dict[str, str]:
    """State per job (array tasks as `ID_TASK`) from `scontrol show job`.

    scontrol still knows a finished job for MinJobAge seconds (300 by default);
    after that the job reads as `UNKNOWN` (without accounting nothing else knows it).
    """
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    states: dict[str, str] = {}
    if proc.returncode != 0:
        return {job_id: "UNKNOWN"}
    for line in proc.stdout.splitlines():
        fields = dict(token.partition("=")[::2] for token in line.split() if "=" in token)
        task = fields.get("ArrayTaskId")
        if task and "-" not in task and "," not in task and "%" not in task:
            name = f"{fields.get('ArrayJobId', job_id)}_{task}"
        elif task:  # still-pending remainder of an array, e.g. `4-9%2`
            name = f"{fields.get('ArrayJobId', job_id)}_[{task}]"
        else:
            name = fields.get("JobId", job_id)
        states[name] = fields.get("JobState", "UNKNOWN")
        if fields.get("Restarts", "0") != "0":
            states[name] += f" (restarts {fields['Restarts']})"
    return states


def failed_array_tasks(array_job_id: str) -> list[int]:
    """Array task ids whose last state is a failure."""
    failed = []
    for name, state in job_states(array_job_id).items():
        _, _, task = name.partition("_")
        if task.isdigit() and state.split()[0] in FAILED_STATES:
            failed.append(int(task))
    return sorted(failed)


def status_lines(run_dir: Path) -> list[str]:
    lines = []
    for record in read_records(run_dir):
        for name, state in job_states(record.job_id).items():
            lines.append(f"{record.kind:<11} {name:<16} {state}")
    return lines


def cancel(run_dir: Path) -> list[str]:
    """scancel every job of the run that is still queued or running; return their ids."""
    cancelled = []
    for record in read_records(run_dir):
        if any(state.split()[0] in ACTIVE_STATES for state in job_states(record.job_id).values()):
            proc = _run(["scancel", record.job_id])
            if proc.returncode != 0:
                raise RuntimeError(f"scancel {record.job_id} failed: {proc.stderr.strip()}")
            cancelled.append(record.job_id)
    return cancelled
