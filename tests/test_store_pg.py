"""Several workers (threads, engines) at once on one store, on SQLite and on a real PostgreSQL
server: concurrent claims (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), the shared rate-limit
row, racing finishes, several engines creating a new store; and PostgreSQL URLs.

Tests taking ``store`` or ``store_url`` run on both backends (see tests/pg.py). What one
worker sees of the store is the contract, tested in test_store_contract.py."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from bulkmail.errors import StoreError
from bulkmail.ratelimit import gcra_reserve
from bulkmail.store import Claimed, Outcome, Stop, Store, Wait, open_store
from bulkmail.store.schema import SCHEMA_VERSION, schema_version
from tests.test_store import join, new_job, people


def run_threads(count: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_concurrent_claims_hand_out_each_delivery_once(store: Store) -> None:
    job_id = store.create_job(new_job(), people(120), now=1.0, domain="d")
    for n in range(4):
        join(store, job_id, f"w{n}", 100.0)
    claimed: list[list[int]] = [[] for _ in range(4)]

    def work(n: int) -> None:
        while True:
            c = store.claim(job_id, f"w{n}", now=100.0)
            if isinstance(c, Stop):
                assert c.finished
                return
            if isinstance(c, Wait):  # the rows left are being claimed by others right now
                assert c.seconds == 0.0
                continue
            assert isinstance(c, Claimed)
            claimed[n].append(c.delivery.position)
            assert store.record(Outcome.sent(c.delivery.id, None, 101.0), f"w{n}")

    run_threads(4, work)
    every = sorted(p for positions in claimed for p in positions)
    assert every == list(range(1, 121))
    states: dict[int, str] = {}

    def finish(n: int) -> None:
        states[n] = store.finish_worker(f"w{n}", now=102.0, stop=None, error=None)

    run_threads(4, finish)
    assert set(states.values()) == {"completed"}
    view = store.view(job_id)
    assert view.job.state == "completed" and view.counts.sent == 120
    assert sorted(w.sent for w in view.workers) == sorted(len(c) for c in claimed)


def test_workers_finishing_at_once_never_leave_the_job_running(store: Store) -> None:
    """The last worker out completes the job, however the finishes interleave; a worker
    finishing while another still has a message in flight leaves the job running."""
    for _ in range(10):
        job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
        join(store, job_id, f"a{job_id}", 100.0)
        join(store, job_id, f"b{job_id}", 100.0)
        for w in (f"a{job_id}", f"b{job_id}"):
            c = store.claim(job_id, w, now=100.0)
            assert isinstance(c, Claimed)
            store.record(Outcome.sent(c.delivery.id, None, 100.0), w)
        barrier = threading.Barrier(2)

        def finish(n: int, job_id: int = job_id, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            store.finish_worker(f"{'ab'[n]}{job_id}", now=101.0, stop=None, error=None)

        run_threads(2, finish)
        assert store.view(job_id).job.state == "completed"
    job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
    join(store, job_id, "x", 100.0)
    join(store, job_id, "y", 100.0)
    c = store.claim(job_id, "y", now=100.0)  # y's message is in flight
    assert isinstance(c, Claimed)
    c2 = store.claim(job_id, "x", now=100.0)
    assert isinstance(c2, Claimed)
    store.record(Outcome.sent(c2.delivery.id, None, 100.0), "x")
    assert store.finish_worker("x", now=101.0, stop=None, error=None) == "running"
    store.record(Outcome.sent(c.delivery.id, None, 102.0), "y")
    assert store.finish_worker("y", now=103.0, stop=None, error=None) == "completed"


def test_the_rate_limit_row_is_shared_by_concurrent_workers(store: Store) -> None:
    """Eight threads reserve slots of one new bucket at once (10/s, burst 1): the row is
    created once and every slot is a distinct tick, 0.1 s apart."""
    slots: list[float] = []
    lock = threading.Lock()

    def reserve(_n: int) -> None:
        for _ in range(5):
            slot = store.reserve_slot("smtp:acct", lambda tat: gcra_reserve(tat, 1000.0, 10, 1))
            with lock:
                slots.append(slot)

    run_threads(8, reserve)
    assert sorted(round(s - 1000.0, 6) for s in slots) == [round(i / 10, 6) for i in range(40)]


# --------------------------------------------------------------------------- several engines


def test_workers_opening_a_new_store_at_once_create_it_once(store_url: str) -> None:
    def open_and_close(_n: int) -> None:
        open_store(store_url).close()

    run_threads(6, open_and_close)
    s = open_store(store_url)
    with s.engine.connect() as conn:
        assert schema_version(conn) == SCHEMA_VERSION
    s.close()


# --------------------------------------------------------------------------- PostgreSQL URLs


def test_a_plain_postgresql_url_uses_psycopg_3(pg_url: str) -> None:
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    s = open_store(plain)
    assert s.engine.dialect.driver == "psycopg"
    assert s.server and s.url.startswith("postgresql://")
    s.close()


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path: Path) -> None:
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed")
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError) as info:
        open_store(f"postgresql://office:hunter2@127.0.0.1:{port}/bulkmail")
    message = str(info.value)
    assert "\n" not in message and "hunter2" not in message
    assert message.startswith(f"postgresql://office:***@127.0.0.1:{port}/bulkmail: ")
