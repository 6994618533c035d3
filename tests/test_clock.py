"""The database's clock (issue 11 item 4): on PostgreSQL, heartbeats, staleness and rate
slots use the server's clock, so hosts whose clocks disagree agree on who is alive and share
the rate; on SQLite (one host) the local clock, or an injected one."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from bulkmail.liveness import worker_alive
from bulkmail.ratelimit import RateLimiter
from bulkmail.store import Store, open_store
from tests.smtp_sink import start_sink_process
from tests.test_multiworker import BULKMAIL, create_job, env_for
from tests.test_store import new_job, people


def db_now(store: Store) -> float:
    with store.engine.connect() as conn:
        return float(conn.execute(sa.text("SELECT extract(epoch from now())")).scalar_one())


def judged_at(offset: float):  # type: ignore[no-untyped-def]
    """Liveness as a host whose clock is ``offset`` seconds off would judge it."""
    return lambda w: worker_alive(w, now=time.time() + offset, host="elsewhere")


def test_on_postgresql_heartbeats_use_the_database_clock(pg_url: str) -> None:
    store = open_store(pg_url)
    job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
    before = db_now(store)
    store.register_worker(job_id, worker_id="w1", host="a", pid=1, alive=judged_at(0))
    assert store.heartbeat("w1") == "running"
    after = db_now(store) + 1.0  # now() is the start of the transaction: allow a little
    [w1] = store.view(job_id).workers
    assert before <= w1.started_at <= w1.heartbeat_at <= after
    store.close()


@pytest.mark.parametrize("offset", [30.0, -30.0])
def test_a_host_with_a_skewed_clock_neither_evicts_nor_is_evicted(
    pg_url: str, offset: float
) -> None:
    store = open_store(pg_url)
    job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
    store.register_worker(job_id, worker_id="w1", host="a", pid=1, alive=judged_at(0))
    store.claim(job_id, "w1", now=time.time())
    store.register_worker(job_id, worker_id="w2", host="b", pid=2, alive=judged_at(offset),
                          exclusive=False)  # fmt: skip
    assert store.reclaim(job_id, worker_id="w2", alive=judged_at(offset)).reclaimed == 0
    assert store.reclaim(job_id, worker_id="w1", alive=judged_at(-offset)).reclaimed == 0
    assert [w.stopped_at for w in store.view(job_id).workers] == [None, None]
    assert store.counts(job_id).sending == 1
    store.close()


def test_on_postgresql_rate_slots_use_the_database_clock(pg_url: str) -> None:
    """Two limiters on hosts 30 s apart share one bucket as if their clocks agreed: each
    gets a relative delay, measured on the server."""
    a, b = open_store(pg_url), open_store(pg_url)
    fast = RateLimiter(a, "smtp:acct", 2.0, 1, clock=lambda: time.time() + 30)
    slow = RateLimiter(b, "smtp:acct", 2.0, 1, clock=lambda: time.time() - 30)
    delays = []
    for limiter in (fast, slow, fast, slow):
        delays.append(limiter.reserve() - limiter.clock())
    for n, delay in enumerate(delays):
        assert n * 0.5 - 0.2 <= delay <= n * 0.5 + 0.05, delays
    a.close()
    b.close()


def test_on_sqlite_an_injected_clock_is_the_store_time(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    store.clock = lambda: 5000.0
    job_id = store.create_job(new_job(), people(1), now=1.0, domain="d")
    store.register_worker(job_id, worker_id="w", host="h", pid=1, alive=lambda w: False)
    store.heartbeat("w")
    [w] = store.view(job_id).workers
    assert (w.started_at, w.heartbeat_at) == (5000.0, 5000.0)
    # a now given by the caller still wins (fixed-time tests)
    store.heartbeat("w", now=6000.0)
    assert store.view(job_id).workers[0].heartbeat_at == 6000.0
    store.close()


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs libfaketime (faketime)")
def test_three_workers_with_skewed_clocks_split_the_work_and_keep_the_rate(
    tmp_path: Path, pg_url: str
) -> None:
    """Three `bulkmail worker` processes on one PostgreSQL job, one with its clock 30 s
    fast and one 30 s slow (libfaketime): each sends a fair share, nobody is evicted, and
    the shared rate holds at the server."""
    rate, burst, n = 40.0, 2, 300
    sink = start_sink_process(tmp_path, "received")
    store = open_store(pg_url)
    try:
        job_id, emails = create_job(store, sink, tmp_path, n, rate=rate, burst=burst)
        env = env_for(tmp_path, sink, store, FAKETIME_DONT_FAKE_MONOTONIC="1")
        commands = [
            ["faketime", "-f", "+30s", BULKMAIL, "worker", str(job_id)],
            ["faketime", "-f", "-30s", BULKMAIL, "worker", str(job_id)],
            [BULKMAIL, "worker", str(job_id)],
        ]
        procs = [
            subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
            for c in commands
        ]  # fmt: skip
        try:
            errors = [p.communicate(timeout=120)[1] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert [p.returncode for p in procs] == [0, 0, 0], errors
        assert not any("gone" in e for e in errors), errors
        view = store.view(job_id)
        assert view.job.state == "completed"
        assert (view.counts.sent, view.counts.in_doubt) == (n, 0)
        assert all(w.stopped_at is not None for w in view.workers)
        shares = [w.sent for w in view.workers]
        assert len(shares) == 3 and all(s > n // 10 for s in shares), shares
        got = sink.received()
        assert Counter(r["recipient"] for r in got) == Counter(emails)
        times = sorted(r["time"] for r in got)
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= rate * (times[j] - start) + burst + 1
    finally:
        store.close()
        sink.stop()
