"""Tie a worker process's life to the process that started the job: when that one dies, even by `kill -9`, the
worker exits within a second instead of finishing (or waiting for) work nobody will collect.

Pool workers are children of multiprocessing's forkserver, not of the job's main process, and they hold their
own task queue open, so nothing tells them the main process is gone: a killed job left its workers and the
forkserver running for half an hour. Two mechanisms, each cheap:
  * Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`: the kernel kills the worker when its parent (the forkserver) dies;
  * a daemon thread that waits on a pidfd of the main process (Linux >= 5.3), or polls it where there is none,
    and exits the worker when the main process ends (a zombie counts as ended: its parent may never reap it).
The forkserver and the resource tracker exit by themselves once the workers are gone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5


def tie_to(main_pid: int) -> None:
    """Call first thing in a worker process: exit this process when `main_pid` (or the direct parent) dies."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent or not _alive(main_pid):  # died before we were watching
        os._exit(1)
    threading.Thread(target=_watch, args=(main_pid, parent), name="plait-lifeline", daemon=True).start()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watch thread still covers it


def _watch(main_pid: int, parent: int) -> None:
    fd = None
    try:
        fd = os.pidfd_open(main_pid)
    except (AttributeError, OSError):  # not Linux, an old kernel, or a sandbox without pidfds: poll
        pass
    while True:
        if fd is not None:
            ready, _, _ = select.select([fd], [], [], _POLL_S)
            ended = bool(ready)
        else:
            time.sleep(_POLL_S)
            ended = not _alive(main_pid)
        if ended or os.getppid() != parent:
            os._exit(1)


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (ended, not yet reaped) is not alive."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: signal 0 tells existence only
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
