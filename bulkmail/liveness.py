"""Is a worker still there? Liveness from the heartbeat and, on this very host, the pid.

A heartbeat is judged by the job store's clock (the database's on PostgreSQL), never by
this host's: a host whose clock runs fast or slow neither evicts the others nor is evicted.
A pid is judged only when the worker runs on this host, which ``host_id`` says: the same
machine, the same boot and the same pid namespace. A hostname alone does not (containers
share hostnames, and a pid means nothing in another pid namespace).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import uuid

from bulkmail.store import WorkerRecord


def _seconds_from_env(name: str, default: float) -> float:
    """A duration from the environment (for fault-injection tests, which need short
    windows in real worker processes); the default when unset or not a positive number."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


HEARTBEAT_INTERVAL = _seconds_from_env("BULKMAIL_HEARTBEAT_INTERVAL", 5.0)
STALE_AFTER = _seconds_from_env("BULKMAIL_STALE_AFTER", 3 * HEARTBEAT_INTERVAL)
"""A heartbeat older than this (by the store's clock): the worker is gone."""


def this_host() -> str:
    return socket.gethostname()


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""


@functools.cache
def this_host_id() -> str:
    """Who "this host" is for pid checks: a hash of the machine id, the boot id and the pid
    namespace, so two containers with one hostname, or one machine after a reboot, differ.
    Without them (no /proc, no machine id) a random id for this process: its pid is then
    never judged by another process, only its heartbeat. ``BULKMAIL_HOST_ID`` overrides it
    (tests that make two processes look like two hosts with one hostname)."""
    override = os.environ.get("BULKMAIL_HOST_ID", "").strip()
    if override:
        return override[:64]
    machine = _read_first_line("/etc/machine-id") or _read_first_line("/var/lib/dbus/machine-id")
    boot = _read_first_line("/proc/sys/kernel/random/boot_id")
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    if not (machine and boot and namespace):
        return "random:" + uuid.uuid4().hex
    digest = hashlib.sha256(f"{machine}\0{boot}\0{namespace}".encode()).hexdigest()
    return digest[:32]


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


def on_this_host(
    worker: WorkerRecord, *, host: str | None = None, host_id: str | None = None
) -> bool:
    """Whether the worker runs here, so that its pid means something: its recorded host id
    is ours. A worker recorded without one (by an older bulkmail) is judged by hostname."""
    if worker.host_id is not None:
        return worker.host_id == (host_id or this_host_id())
    return worker.host == (host or this_host())


def worker_alive(
    worker: WorkerRecord,
    *,
    now: float,
    host: str | None = None,
    host_id: str | None = None,
    stale_after: float = STALE_AFTER,
) -> bool:
    """A worker is alive while it has not stopped, its heartbeat is fresh and, when it runs
    on this host, its pid still runs. A dead pid on this host counts at once; a worker on
    another host (or in another pid namespace) only by its heartbeat (a slow worker is not
    a dead one).

    The heartbeat's age is measured by the clock that wrote it: a record the store read
    for a judgement carries the store's time of that read (``read_at``, the database's
    clock on PostgreSQL), which then stands in for ``now``."""
    if worker.stopped_at is not None:
        return False
    current = worker.read_at if worker.read_at is not None else now
    if current - worker.heartbeat_at > stale_after:
        return False
    if on_this_host(worker, host=host, host_id=host_id):
        return pid_running(worker.pid)
    return True
