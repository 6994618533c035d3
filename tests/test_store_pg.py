"""The job store with several workers on one job, on SQLite and on a real PostgreSQL server:
concurrent claims, the shared rate-limit row, racing finishes, reclaiming the deliveries of a
worker that stopped heart-beating (never of a slow one), schema versions and migrations.

Tests taking ``store`` or ``store_url`` run on both backends (see tests/pg.py); the
PostgreSQL ones skip, with the reason, where no server can be had."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bulkmail.errors import JobStateError, StoreError
from bulkmail.procs import STALE_AFTER, worker_alive
from bulkmail.ratelimit import gcra_reserve
from bulkmail.store import (
    Claimed,
    NewDelivery,
    Stop,
    Store,
    Wait,
    WorkerRecord,
    open_store,
)
from bulkmail.store import sql as store_module
from bulkmail.store.sql import schema_version
from tests.test_store import new_job, people


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


def alive_at(now: float) -> Callable[[WorkerRecord], bool]:
    """Liveness as another host sees it at ``now``: by the heartbeat alone."""
    return lambda w: worker_alive(w, now=now, host="another-host", stale_after=STALE_AFTER)


def join(store: Store, job_id: int, worker: str, now: float) -> None:
    store.register_worker(
        job_id,
        worker_id=worker,
        host=f"host-{worker}",
        pid=1000,
        now=now,
        alive=alive_at(now),
        exclusive=False,
    )


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


# --------------------------------------------------------------------------- several workers


def test_workers_join_a_job_that_resume_would_refuse(store: Store) -> None:
    job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
    join(store, job_id, "w1", 100.0)
    join(store, job_id, "w2", 101.0)  # additive: w1 is alive and stays
    with pytest.raises(JobStateError, match="being run by worker pid 1000 on host-w1"):
        store.register_worker(
            job_id, worker_id="w3", host="h", pid=3, now=102.0, alive=alive_at(102.0)
        )
    view = store.view(job_id)
    assert [w.id for w in view.workers if w.stopped_at is None] == ["w1", "w2"]


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
            assert store.record_sent(c.delivery.id, f"w{n}", provider_message_id=None, now=101.0)

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
            store.record_sent(c.delivery.id, w, provider_message_id=None, now=100.0)
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
    store.record_sent(c2.delivery.id, "x", provider_message_id=None, now=100.0)
    assert store.finish_worker("x", now=101.0, stop=None, error=None) == "running"
    store.record_sent(c.delivery.id, "y", provider_message_id=None, now=102.0)
    assert store.finish_worker("y", now=103.0, stop=None, error=None) == "completed"


def test_a_silent_workers_deliveries_are_reclaimed_never_a_slow_ones(store: Store) -> None:
    job_id = store.create_job(new_job(), people(4), now=1.0, domain="d")
    join(store, job_id, "slow", 100.0)
    join(store, job_id, "live", 100.0)
    first = store.claim(job_id, "slow", now=100.0)
    assert isinstance(first, Claimed)
    # 'slow' waits a minute for its server's reply, heart-beating all along
    for t in range(105, 161, 5):
        assert store.heartbeat("slow", now=float(t)) == "running"
        assert store.heartbeat("live", now=float(t)) == "running"
        held = store.reclaim(job_id, worker_id="live", now=float(t), alive=alive_at(t))
        assert (held.reclaimed, held.elsewhere) == (0, 1)
    assert store.record_sent(first.delivery.id, "slow", provider_message_id=None, now=160.0)
    second = store.claim(job_id, "slow", now=160.0)
    assert isinstance(second, Claimed)
    # ... and now 'slow' goes silent (kill -9, a lost host): its heartbeat stays at 160
    now = 160.0 + STALE_AFTER  # not yet stale
    assert store.reclaim(job_id, worker_id="live", now=now, alive=alive_at(now)).reclaimed == 0
    now += 1.0
    held = store.reclaim(job_id, worker_id="live", now=now, alive=alive_at(now))
    assert (held.reclaimed, held.elsewhere) == (1, 0)
    # the silent worker can no longer record an outcome for it, and learns it was replaced
    assert not store.record_sent(second.delivery.id, "slow", provider_message_id=None, now=now)
    assert store.heartbeat("slow", now=now) == "stopped"
    again = store.claim(job_id, "live", now=now)
    assert isinstance(again, Claimed)
    assert again.delivery.id == second.delivery.id
    assert again.delivery.message_id == second.delivery.message_id
    assert again.delivery.in_doubt and again.delivery.attempts == 2
    workers = {w.id: w for w in store.view(job_id).workers}
    assert workers["slow"].stopped_at == now and workers["live"].stopped_at is None
    # the caller itself is never taken for gone, even with a stale heartbeat of its own
    later = now + 10 * STALE_AFTER
    assert store.reclaim(job_id, worker_id="live", now=later, alive=alive_at(later)) == (
        store_module.Reclaimed(0, 0)
    )
    assert store.counts(job_id).sending == 1


def test_reclaim_leaves_a_job_that_is_not_running_alone(store: Store) -> None:
    job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
    join(store, job_id, "w1", 100.0)
    join(store, job_id, "w2", 100.0)
    assert isinstance(store.claim(job_id, "w1", now=100.0), Claimed)
    store.cancel(job_id, now=101.0)
    held = store.reclaim(job_id, worker_id="w2", now=1000.0, alive=alive_at(1000.0))
    assert (held.reclaimed, held.elsewhere) == (0, 0)
    assert store.counts(job_id).sending == 1


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


def test_a_long_address_is_stored_on_every_backend(store: Store) -> None:
    long = "x" * 400 + "@example.edu"
    job_id = store.create_job(
        new_job(), [NewDelivery(2, long, "n", {}, "invalid address")], now=1.0, domain="d"
    )
    assert next(iter(store.deliveries(job_id))).email == long


# --------------------------------------------------------------------------- schema versions


def _version(store: Store) -> int | None:
    with store.engine.connect() as conn:
        return schema_version(conn)


def test_a_store_without_a_recorded_version_is_upgraded(store_url: str) -> None:
    s = open_store(store_url)
    job_id = s.create_job(new_job(), people(2), now=1.0, domain="d")
    with s.engine.begin() as conn:  # as a store made before versions were recorded
        conn.execute(sa.text("DROP TABLE meta"))
    assert _version(s) == 0
    s.close()
    s = open_store(store_url)
    assert _version(s) == store_module.SCHEMA_VERSION
    assert s.counts(job_id).pending == 2
    s.close()


def test_migrations_run_in_order_in_one_transaction(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_store(store_url)
    job_id = s.create_job(new_job(), people(1), now=1.0, domain="d")
    s.close()
    version = store_module.SCHEMA_VERSION

    def add_column(conn: sa.Connection) -> None:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN note TEXT"))

    def broken(conn: sa.Connection) -> None:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN other TEXT"))
        raise RuntimeError("step failed")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", version + 1)
    monkeypatch.setitem(store_module.MIGRATIONS, version, add_column)
    s = open_store(store_url)
    assert _version(s) == version + 1
    columns = {c["name"] for c in sa.inspect(s.engine).get_columns("jobs")}
    assert "note" in columns
    assert s.get_job(job_id).total == 1
    s.close()
    # a failing step leaves the store exactly as it was
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", version + 2)
    monkeypatch.setitem(store_module.MIGRATIONS, version + 1, broken)
    with pytest.raises(RuntimeError, match="step failed"):
        open_store(store_url)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", version + 1)
    s = open_store(store_url)
    assert _version(s) == version + 1
    assert "other" not in {c["name"] for c in sa.inspect(s.engine).get_columns("jobs")}
    s.close()
    # and an older bulkmail refuses a store a newer one has upgraded
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", version)
    with pytest.raises(StoreError, match="made by a newer bulkmail"):
        open_store(store_url)


def test_workers_opening_a_new_store_at_once_create_it_once(store_url: str) -> None:
    def open_and_close(_n: int) -> None:
        open_store(store_url).close()

    run_threads(6, open_and_close)
    s = open_store(store_url)
    assert _version(s) == store_module.SCHEMA_VERSION
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
