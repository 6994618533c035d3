"""Worker liveness: a dead pid counts at once on this host, a stale heartbeat anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bulkmail.documents import effective_state
from bulkmail.liveness import STALE_AFTER, pid_running, this_host, worker_alive
from bulkmail.store import Counts, JobView, WorkerRecord
from tests.test_store import new_job

NOW = 1_800_000_000.0


def worker(pid: int, *, heartbeat: float, host: str | None = None) -> WorkerRecord:
    return WorkerRecord(
        id="w",
        job_id=1,
        host=host or this_host(),
        pid=pid,
        started_at=heartbeat - 60,
        heartbeat_at=heartbeat,
        stopped_at=None,
        sent=0,
    )


def test_this_process_is_alive_and_a_reaped_child_is_not() -> None:
    assert pid_running(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_running(child.pid)


def test_a_zombie_counts_as_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # not reaped yet: the process table keeps a zombie until wait()
    for _ in range(200):
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert not pid_running(child.pid)
    child.wait()


def test_fresh_heartbeat_and_live_pid_is_alive() -> None:
    assert worker_alive(worker(os.getpid(), heartbeat=NOW - 1), now=NOW)


def test_stale_heartbeat_is_gone_even_with_a_live_pid() -> None:
    w = worker(os.getpid(), heartbeat=NOW - STALE_AFTER - 1)
    assert not worker_alive(w, now=NOW)
    assert worker_alive(w, now=NOW, stale_after=STALE_AFTER + 5)


def test_other_host_judged_by_heartbeat_only() -> None:
    w = worker(999_999_999, heartbeat=NOW - 3, host="elsewhere.example.edu")
    assert worker_alive(w, now=NOW)  # a slow worker elsewhere is not a dead one
    assert not worker_alive(w, now=NOW + STALE_AFTER)


def test_running_job_without_a_live_worker_is_shown_stalled() -> None:
    from dataclasses import asdict

    from bulkmail.store import JobRecord

    values = asdict(new_job())
    job = JobRecord(
        id=1,
        token="t",
        state="running",
        total=1,
        created_at=NOW,
        started_at=NOW,
        finished_at=None,
        error=None,
        log_path=None,
        **values,
    )
    alive = JobView(job, Counts(pending=1), [worker(os.getpid(), heartbeat=NOW - 2)])
    assert effective_state(alive, now=NOW) == "running"
    dead = JobView(job, Counts(pending=1), [worker(999_999_999, heartbeat=NOW - 2)])
    assert effective_state(dead, now=NOW) == "stalled"
    hung = JobView(job, Counts(pending=1), [worker(os.getpid(), heartbeat=NOW - 60)])
    assert effective_state(hung, now=NOW) == "stalled"
