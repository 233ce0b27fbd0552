"""Multi-process training on one machine: `plait launch local --nproc N -- <train args>`.

torchrun rather than `accelerate launch`: on CPU, `accelerate launch --cpu
--num_processes N` runs the script once, non-distributed, whereas torchrun
gives N gloo ranks (and NCCL ranks on a GPU machine) with the same script.
"""
from __future__ import annotations

import shlex
import signal
import subprocess
import sys


def local_command(nproc: int, train_args: list[str], cpu: bool, python: str = sys.executable) -> list[str]:
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    args = list(train_args) + (["--set", "train.device=cpu"] if cpu else [])
    if nproc == 1:
        return [python, "-m", "pipeline.train", *args]
    # --standalone: a private rendezvous on a free local port, so two local runs never collide.
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "pipeline.train", *args]


def run_local(nproc: int, train_args: list[str], cpu: bool, dry_run: bool = False) -> int:
    cmd = local_command(nproc, train_args, cpu)
    if dry_run:
        print(shlex.join(cmd))
        return 0
    proc = subprocess.Popen(cmd)

    # Pass preemption-style signals on, so training checkpoints and exits 75 as under SLURM.
    # torchrun dies on USR1 (no handler) but forwards TERM to its workers, so it gets TERM.
    def forward(signum, _frame):
        proc.send_signal(signum if nproc == 1 else signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
