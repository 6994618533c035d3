"""Is a worker still there? Liveness from the pid (on this host) and the heartbeat."""

from __future__ import annotations

import os
import socket

from bulkmail.store import WorkerRecord

HEARTBEAT_INTERVAL = 5.0  # seconds between a worker's heartbeats
STALE_AFTER = 3 * HEARTBEAT_INTERVAL  # a heartbeat older than this: the worker is gone


def this_host() -> str:
    return socket.gethostname()


def pid_running(pid: int) -> bool:
    """True when a process with this pid exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # "pid (comm) S ...": the state follows the last ')'
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust kill(0)
    return state not in ("Z", "X")


def worker_alive(
    worker: WorkerRecord, *, now: float, host: str | None = None, stale_after: float = STALE_AFTER
) -> bool:
    """A worker is alive while it has not stopped, its heartbeat is fresh and, when it runs
    on this host, its pid still runs. A dead pid on this host counts at once; a worker on
    another host only by its heartbeat (a slow worker is not a dead one)."""
    if worker.stopped_at is not None:
        return False
    if now - worker.heartbeat_at > stale_after:
        return False
    if worker.host == (host or this_host()):
        return pid_running(worker.pid)
    return True
