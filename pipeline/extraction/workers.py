"""Worker processes that end with the process that started them.

A ``ProcessPoolExecutor`` worker whose parent is killed (``kill -9``, the OOM
killer) would otherwise keep writing shards for a job nobody will finish, then
idle forever. :func:`die_with_parent` is the pool's initializer: on Linux the
kernel sends the worker SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), and
everywhere a daemon thread watches the parent's pid and ends the worker when it
changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
WATCH_SECONDS = 1.0


def machine_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def shard_worker() -> None:
    """Initializer of an extract worker process: it ends with its parent, and its compiled loops run
    on one thread, since the pool already runs one worker per core."""
    die_with_parent()
    import numba

    numba.set_num_threads(1)


def die_with_parent() -> None:
    """Arrange for this process to end when its parent does (a pool initializer)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher below still ends the worker
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="die-with-parent").start()


def _watch(parent: int) -> None:
    while True:
        time.sleep(WATCH_SECONDS)
        if os.getppid() != parent:
            os._exit(1)
