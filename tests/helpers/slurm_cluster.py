"""A real single-machine SLURM cluster for tests: munged + slurmctld + two slurmd.

Everything lives under one directory (config, state, spools, logs, PID files,
a private munge socket and key), so a test run never touches /etc/slurm or a
system munged, and `stop()` ends exactly the daemons it started, by PID file.
Two emulated nodes are two `slurmd -N` processes on distinct ports; their
`NodeAddr` is 127.0.0.1 so nothing needs /etc/hosts.

Use `SlurmCluster.start_or_skip(root)` from a fixture: it installs the Debian
packages through scripts/install_slurm.sh when they are missing and calls
`pytest.skip` with the reason when the cluster cannot come up.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_slurm.sh"
NODE_NAMES = ("n1", "n2")
# config_overrides lets a node declare more CPUs than the VM has: each
# emulated node claims 4 so a 2-node x 2-process job fits on a 2-core machine.
CPUS_PER_NODE = 4
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")

SLURM_CONF_TEMPLATE = """\
ClusterName=plaitci
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job otherwise waits 120 s before it may start again.
AuthInfo=socket={munge_socket},cred_expire=5
# Short scheduler intervals: dependent and requeued jobs otherwise wait 10-20 s.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _total_memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("MemTotal missing from /proc/meminfo")


def unavailable_reason() -> str | None:
    """Why a SLURM cluster cannot run here (after trying to install it), or None."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing and INSTALL_SCRIPT.exists():
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=False, capture_output=True, timeout=600)
        missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM not installed and not installable here (missing {', '.join(missing)}; see scripts/install_slurm.sh)"
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd runs as root)"
    return None


class SlurmCluster:
    """munged + slurmctld + one slurmd per emulated node, all under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.nodes = NODE_NAMES
        self._pid_files: list[Path] = []

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, squeue, ...) and the launcher."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ---- lifecycle -------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "state").mkdir(exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._daemon(["slurmctld", "-f", str(self.conf), "-c"], self.root / "slurmctld.pid")
        for name in self.nodes:
            (self.root / f"spool-{name}").mkdir(exist_ok=True)
            self._daemon(["slurmd", "-f", str(self.conf), "-N", name], self.root / f"slurmd-{name}.pid")
        self.wait_nodes_idle(timeout_s)

    def stop(self) -> None:
        # Reverse order: nodes, controller, then munge (the others need it to shut down cleanly).
        for pid_file in reversed(self._pid_files):
            pid = self._read_pid(pid_file)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._pid_files.clear()

    @classmethod
    def start_or_skip(cls, root: Path) -> "SlurmCluster":
        import pytest

        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
        cluster = cls(root)
        try:
            cluster.start()
        except Exception as exc:  # noqa: BLE001 - any failure to boot means "no cluster here"
            logs = cluster.tail_logs()
            cluster.stop()
            pytest.skip(f"SLURM test cluster failed to start: {exc}\n{logs}")
        return cluster

    # ---- client helpers --------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, check=check, capture_output=True, text=True,
                              timeout=timeout_s)

    def wait_nodes_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states = ""
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = out.stdout.strip()
            lines = [line.split() for line in states.splitlines() if line.strip()]
            if len(lines) == len(self.nodes) and all(state == "idle" for _, state in lines):
                return
            time.sleep(0.5)
        raise TimeoutError(f"nodes not idle after {timeout_s:.0f}s: {states!r}")

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (for a finished job until MinJobAge passes)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields: dict[str, str] = {}
        for token in out.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, timeout_s: float) -> dict[str, str]:
        """Wait until the job reaches a final state; `sbatch -W` returns late, so poll."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout_s
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job_state(job_id)
            if fields.get("JobState") in final:
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout_s:.0f}s: {fields.get('JobState')}")

    def tail_logs(self, num_lines: int = 15) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-num_lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---- internals -------------------------------------------------------
    def _start_munge(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        # munged refuses root and lax directory permissions unless forced; the
        # directory is private to this test run, so --force is safe here.
        self._daemon(["munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
                      f"--seed-file={munge_dir / 'munged.seed'}"], munge_dir / "munged.pid")

    def _write_conf(self) -> None:
        memory_mb = max(1024, _total_memory_mb() // len(self.nodes) // 2)
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={CPUS_PER_NODE} RealMemory={memory_mb} State=UNKNOWN"
            for name in self.nodes)
        self.conf.write_text(SLURM_CONF_TEMPLATE.format(
            hostname=socket.gethostname(), ctld_port=free_port(), root=self.root,
            munge_socket=self.munge_socket, node_lines=node_lines))

    def _daemon(self, cmd: list[str], pid_file: Path, timeout_s: float = 15.0) -> None:
        """Start a self-daemonizing program and wait for its PID file."""
        self._pid_files.append(pid_file)
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = self._read_pid(pid_file)
            if pid is not None and _alive(pid):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{cmd[0]} wrote no live PID to {pid_file}")

    @staticmethod
    def _read_pid(pid_file: Path) -> int | None:
        try:
            return int(pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
