"""Preemption: SIGTERM / SIGUSR1 set a flag; every rank agrees at a step boundary to checkpoint and exit 75.

SLURM sends SIGTERM before killing a job (and `--signal=B:USR1@N` some seconds before its time limit); the
launcher treats exit status 75 (EX_TEMPFAIL) as "requeue me" and the requeued job resumes with `--resume auto`.
A signal handler only sets a flag: checkpointing inside the handler could interrupt a collective half-way.
Ctrl-C (SIGINT) asks for the same orderly stop. A second SIGINT/SIGTERM means "now": the process kills its own
loader workers and exits at once (128 + signal number), whatever it was waiting for. USR1 never counts towards
that: the launcher repeats it every 30 s while a checkpoint is being written.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time

import torch

from pipeline.train.distributed import all_reduce_max

# Exit status of a run that checkpointed because it was asked to stop; launch/ requeues on it.
EXIT_REQUEUE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# The signals a person (or `kill`, or a scheduler giving up) sends again to mean "exit now".
URGENT = (signal.SIGTERM, signal.SIGINT)


def exit_now(signum: int) -> None:
    """Kills this process's own multiprocessing children (the loader's workers, which ignore the stop signals so
    that they outlive the first one) and exits with 128 + signum without any cleanup that could block."""
    for child in multiprocessing.active_children():
        child.kill()
    _say(f"plait: second {signal.Signals(signum).name}: exiting now, without a checkpoint")
    os._exit(128 + signum)


def _say(line: str) -> None:
    """One line to stderr from a signal handler: os.write, since the interrupted code may be inside
    sys.stderr's own write (a reentrant call there raises)."""
    os.write(2, (line + "\n").encode())


class StopFlag:
    """Installed first thing in a run, so a signal during start-up (model build, loader start) is not fatal."""

    def __init__(self):
        self.signal_name: str | None = None
        self.urgent_count = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum in URGENT:
            self.urgent_count += 1
            if self.urgent_count >= 2:
                exit_now(signum)
        if self.signal_name is None:
            _say(f"plait: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
                 f"(SIGINT/SIGTERM again: exit at once)")
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def restoring_signals():
    """Puts back the handlers of the stop signals when the block ends, however it ends: a run that raised before
    StopFlag.restore must not leave its handler (which swallows the first Ctrl-C) in a longer-lived process."""
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopPolicy:
    """Decides, identically on every rank, whether to stop after the current step and why."""

    def __init__(self, flag: StopFlag, max_time_s: float, device: torch.device):
        self.flag, self.max_time_s, self.device = flag, max_time_s, device
        self.started = time.monotonic()

    def check(self) -> str | None:
        """'signal', 'max_time_s' or None. One tiny all-reduce: a signal seen by any rank stops them all."""
        local = 2.0 if self.flag.signal_name else 0.0
        if not local and self.max_time_s and time.monotonic() - self.started > self.max_time_s:
            local = 1.0
        agreed = all_reduce_max(local, self.device)
        return {2.0: "signal", 1.0: "max_time_s"}.get(agreed)
