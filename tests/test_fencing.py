"""Fencing (issue 11 item 3) and worker identity (item 5).

- a worker sends only while it owns its delivery: its lease (the monotonic start of its last
  renewed heartbeat) must be fresh, else it renews first and sends nothing once taken over;
- a renewal never crosses a take-over: a stopped worker's heartbeat is not renewed;
- real processes on PostgreSQL: a worker frozen with SIGSTOP past the stale window, between
  its claim and its send, and continued, sends nothing twice; one frozen at any moment
  duplicates at most its message in flight, with the same Message-ID;
- two workers whose hosts share a hostname never judge each other's pids.
Unit tests use injected clocks; the process tests use short windows set by environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bulkmail.liveness import on_this_host, this_host, this_host_id, worker_alive
from bulkmail.manager import EmailManager
from bulkmail.providers.base import Provider
from bulkmail.store import Claimed, JobRecord, Outcome, Store, WorkerRecord, open_store
from bulkmail.store.schema import SCHEMA_VERSION, schema_version
from tests.smtp_sink import SinkProcess, start_sink_process
from tests.test_multiworker import create_job, env_for, heartbeating, start_workers, wait_until
from tests.test_store import new_job, people

WINDOWS = {"BULKMAIL_HEARTBEAT_INTERVAL": "0.4", "BULKMAIL_STALE_AFTER": "2.5"}


class Monotonic:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def no_provider(job: JobRecord) -> Provider:
    raise AssertionError("not used")


def manager_on(store: Store, job_id: int, mono: Monotonic) -> EmailManager:
    m = EmailManager(
        store,
        job_id,
        provider_factory=no_provider,
        clock=lambda: 1000.0,
        heartbeat_interval=5.0,
        stale_after=15.0,
        monotonic=mono,
    )
    store.register_worker(job_id, worker_id=m.worker_id, host="h", pid=1, now=1000.0,
                          alive=lambda w: False)  # fmt: skip
    return m


def heartbeats(store: Store, worker_id: str) -> float:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT heartbeat_at FROM workers WHERE id = :w"),
                            {"w": worker_id})  # fmt: skip
        return float(rows.scalar_one())


# --------------------------------------------------------------------------- the fence


def test_a_fresh_lease_sends_without_asking_the_store(tmp_path: Path) -> None:
    store, mono = open_store(tmp_path / "s.db"), Monotonic()
    job_id = store.create_job(new_job(), people(1), now=1.0, domain="d")
    m = manager_on(store, job_id, mono)
    assert m.lease_window == 10.0  # the stale window less one heartbeat interval
    # no renewed heartbeat yet: the fence renews one (at the store's time, 1000.0 here)
    store.heartbeat(m.worker_id, now=900.0)
    assert m._still_owner()
    assert heartbeats(store, m.worker_id) == 1000.0
    # within the window: no store call at all
    store.heartbeat(m.worker_id, now=900.0)
    mono.now += 9.9
    assert m._still_owner()
    assert heartbeats(store, m.worker_id) == 900.0
    store.close()


def test_a_stale_lease_renews_first_and_sends_when_nobody_took_over(tmp_path: Path) -> None:
    store, mono = open_store(tmp_path / "s.db"), Monotonic()
    job_id = store.create_job(new_job(), people(1), now=1.0, domain="d")
    m = manager_on(store, job_id, mono)
    assert m._still_owner()
    mono.now += 3600.0  # frozen for an hour, but nobody looked
    store.heartbeat(m.worker_id, now=900.0)
    assert m._still_owner()
    assert heartbeats(store, m.worker_id) == 1000.0  # renewed before the send
    store.close()


def test_a_worker_taken_over_while_frozen_sends_nothing(tmp_path: Path) -> None:
    store, mono = open_store(tmp_path / "s.db"), Monotonic()
    job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
    m = manager_on(store, job_id, mono)
    assert m._still_owner()
    claimed = store.claim(job_id, m.worker_id, now=1000.0)
    assert isinstance(claimed, Claimed)
    mono.now += 16.0  # frozen past the stale window
    # another worker judged it gone and took its delivery over
    store.register_worker(job_id, worker_id="other", host="h2", pid=2, now=1016.0,
                          alive=lambda w: False, exclusive=False)  # fmt: skip
    assert not m._still_owner()
    assert heartbeats(store, m.worker_id) == 1000.0  # a stopped worker is not renewed
    # its delivery is the other worker's now: nothing of it can be recorded
    d = claimed.delivery
    assert not store.record(Outcome.sent(d.id, "x", 1017.0), m.worker_id)
    again = store.get_job(job_id)
    assert again.state == "running"
    assert store.counts(job_id).in_doubt == 1
    store.close()


def test_a_heartbeat_after_a_take_over_says_stopped_and_renews_nothing(store: Store) -> None:
    job_id = store.create_job(new_job(), people(1), now=1.0, domain="d")
    store.register_worker(job_id, worker_id="w1", host="h", pid=1, now=100.0,
                          alive=lambda w: False)  # fmt: skip
    store.register_worker(job_id, worker_id="w2", host="h2", pid=2, now=200.0,
                          alive=lambda w: w.id != "w1", exclusive=False)  # fmt: skip
    assert store.heartbeat("w1", now=201.0) == "stopped"
    assert store.heartbeat("w2", now=201.0) == "running"
    assert {w.id: w.heartbeat_at for w in store.view(job_id).workers} == {"w1": 100.0, "w2": 201.0}


# --------------------------------------------------------------------------- worker identity


def record(host: str, host_id: str | None, pid: int, heartbeat: float = 100.0) -> WorkerRecord:
    return WorkerRecord(
        id="w", job_id=1, host=host, pid=pid, started_at=0.0, heartbeat_at=heartbeat,
        stopped_at=None, sent=0, host_id=host_id,
    )  # fmt: skip


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_pid_is_judged_only_on_the_same_machine_boot_and_pid_namespace() -> None:
    pid, me = dead_pid(), this_host_id()
    assert me == this_host_id() and len(me) <= 64
    # same hostname, another host id (a container): judged by its heartbeat alone
    twin = record(this_host(), "another-container", pid)
    assert not on_this_host(twin)
    assert worker_alive(twin, now=101.0)
    assert not worker_alive(twin, now=100.0 + 16.0)  # STALE_AFTER: 15 s
    # this very host: a dead pid is gone at once
    assert not worker_alive(record("renamed", me, pid), now=101.0)
    assert worker_alive(record("renamed", me, os.getpid()), now=101.0)
    # recorded by an older bulkmail (no host id): the hostname decides, as before
    assert not worker_alive(record(this_host(), None, pid), now=101.0)


def test_read_at_is_the_clock_a_heartbeat_is_judged_by() -> None:
    w = record("elsewhere", "x", 1, heartbeat=100.0)
    from dataclasses import replace

    assert worker_alive(replace(w, read_at=110.0), now=10_000.0)  # the caller's clock is off
    assert not worker_alive(replace(w, read_at=116.0), now=100.0)


def test_a_store_of_schema_2_gains_host_id(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    s = open_store(path)
    job_id = s.create_job(new_job(), people(1), now=1.0, domain="d")
    s.register_worker(job_id, worker_id="old", host="h", pid=1, now=5.0, alive=lambda w: False)
    with s.engine.begin() as conn:  # what schema 2 looked like
        conn.execute(sa.text("ALTER TABLE workers DROP COLUMN host_id"))
        conn.execute(sa.text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
    s.close()
    s = open_store(path)
    with s.engine.connect() as conn:
        assert schema_version(conn) == SCHEMA_VERSION  # 2 -> 3 -> every step since
    assert [w.host_id for w in s.view(job_id).workers] == [None]
    s.finish_worker("old", now=6.0, stop="paused", error=None)
    s.register_worker(job_id, worker_id="new", host="h", pid=1, now=7.0, alive=lambda w: False,
                      host_id="abc")  # fmt: skip
    assert {w.id: w.host_id for w in s.view(job_id).workers} == {"old": None, "new": "abc"}
    s.close()


@pytest.fixture
def slow_sink(tmp_path: Path) -> Iterator[SinkProcess]:
    s = start_sink_process(tmp_path, "received", delay=0.05)
    yield s
    s.stop()


def test_a_twin_host_with_the_same_hostname_is_not_evicted_by_its_pid(
    tmp_path: Path, slow_sink: SinkProcess
) -> None:
    """A worker 'on another container' (same hostname, its own host id, a pid that does not
    run here) holds a message in flight and heartbeats; a real worker on this host runs
    the rest of the job: it never takes the twin for gone, and resends nothing."""
    store = open_store(tmp_path / "jobs.db")
    job_id, emails = create_job(store, slow_sink, tmp_path, 12)
    store.register_worker(job_id, worker_id="twin", host=this_host(), pid=dead_pid(),
                          now=time.time(), alive=lambda w: False,
                          host_id="another-container")  # fmt: skip
    held = store.claim(job_id, "twin", now=time.time())
    assert isinstance(held, Claimed)
    env = env_for(tmp_path, slow_sink, store, **WINDOWS)
    with heartbeating(store, "twin", every=0.2):
        [worker] = start_workers(env, job_id, 1)
        try:
            slow_sink.wait_for(11, timeout=60)
            time.sleep(1.0)  # several of the worker's heartbeats, each looking for the gone
            assert worker.poll() is None  # it waits for the twin's message in flight
            assert store.record(Outcome.sent(held.delivery.id, "p", time.time()), "twin")
            _, err = worker.communicate(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
    assert worker.returncode == 0, err
    assert "gone" not in err, err
    view = store.view(job_id)
    assert view.job.state == "completed"
    assert (view.counts.sent, view.counts.in_doubt) == (12, 0)
    twin = next(w for w in view.workers if w.id == "twin")
    assert twin.stopped_at is None and twin.host_id == "another-container"
    mine = next(w for w in view.workers if w.id != "twin")
    assert mine.host_id == this_host_id()  # recorded from the environment's own view
    got = Counter(r["recipient"] for r in slow_sink.received())
    assert set(got) == set(emails) - {held.delivery.email} and max(got.values()) == 1
    store.close()


# --------------------------------------------------------------------------- real processes


def finish(procs: list[subprocess.Popen[str]], timeout: float = 90) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_worker_frozen_between_claim_and_send_sends_nothing_it_no_longer_owns(
    tmp_path: Path, slow_sink: SinkProcess, pg_url: str
) -> None:
    """Two workers on a PostgreSQL job; one stops itself with SIGSTOP right after its 5th
    claim (committed, not yet sent) and is continued well past the stale window, after the
    other took its delivery over: the fence stops it before the send. Nobody is missed and
    nobody gets two copies."""
    store = open_store(pg_url)
    job_id, emails = create_job(store, slow_sink, tmp_path, 60)
    env = env_for(tmp_path, slow_sink, store, **WINDOWS)
    procs = start_workers(env, job_id, 2, {0: {"BULKMAIL_FAILPOINT": "after_claim:5:STOP"}})
    frozen = procs[0]
    try:
        wait_until(lambda: _state(frozen.pid) == "T", 60, "the worker to stop itself")
        me = _worker(store, job_id, frozen.pid)
        wait_until(lambda: _worker(store, job_id, frozen.pid).stopped_at is not None, 60,
                   "the other worker to take the frozen one over")  # fmt: skip
        assert me.stopped_at is None
        os.kill(frozen.pid, signal.SIGCONT)
        errors = finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
    assert procs[1].returncode == 0, errors[1]
    assert "not sending" in errors[0], errors[0]
    view = store.view(job_id)
    assert view.job.state == "completed"
    assert (view.counts.sent, view.counts.in_doubt) == (60, 1)
    got = slow_sink.received()
    per_rcpt = Counter(r["recipient"] for r in got)
    assert set(per_rcpt) == set(emails)
    assert [e for e, n in per_rcpt.items() if n > 1] == []  # the fence held: no duplicate
    frozen_record = next(w for w in view.workers if w.pid == frozen.pid)
    assert frozen_record.sent == 4
    store.close()


def test_a_worker_frozen_at_any_moment_duplicates_at_most_its_message_in_flight(
    tmp_path: Path, pg_url: str
) -> None:
    """The same with a SIGSTOP from outside while messages are going out through a sink
    slow to answer (a message is in flight most of the time): at most one duplicate (one
    sending thread), with the same Message-ID."""
    sink = start_sink_process(tmp_path, "received", delay=0.2)
    store = open_store(pg_url)
    try:
        job_id, emails = create_job(store, sink, tmp_path, 40)
        env = env_for(tmp_path, sink, store, **WINDOWS)
        procs = start_workers(env, job_id, 2)
        frozen = procs[0]
        try:
            wait_until(lambda: _sent_by(store, job_id, frozen.pid) >= 3, 60, "a few sends")
            os.kill(frozen.pid, signal.SIGSTOP)
            wait_until(lambda: _worker(store, job_id, frozen.pid).stopped_at is not None, 60,
                       "the other worker to take the frozen one over")  # fmt: skip
            os.kill(frozen.pid, signal.SIGCONT)
            errors = finish(procs)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
        assert procs[1].returncode == 0, errors[1]
        view = store.view(job_id)
        assert view.job.state == "completed" and view.counts.sent == 40
        got = sink.received()
        per_rcpt = Counter(r["recipient"] for r in got)
        assert set(per_rcpt) == set(emails)
        dupes = [e for e, n in per_rcpt.items() if n > 1]
        assert len(dupes) <= 1 and all(per_rcpt[e] == 2 for e in dupes)
        for e in dupes:
            assert len({r["message_id"] for r in got if r["recipient"] == e}) == 1
    finally:
        store.close()
        sink.stop()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def _worker(store: Store, job_id: int, pid: int) -> WorkerRecord:
    return next(w for w in store.view(job_id).workers if w.pid == pid)


def _sent_by(store: Store, job_id: int, pid: int) -> int:
    found = [w for w in store.view(job_id).workers if w.pid == pid]
    return found[0].sent if found else 0
