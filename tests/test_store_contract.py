"""The job store's contract (``bulkmail.store.contract``), one suite for every backend.

Like huey's ``StorageTests``: each test takes ``store`` (conftest.py), so it runs on a real
SQLite file and on a real PostgreSQL database; the read tests take ``reads``, so they also
run through the light sqlite3 reader of ``status``/``recent``/``report``. Several workers on
one store (threads, engines) are in test_store_pg.py; SQLite files in test_store.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from bulkmail.errors import InputError, JobNotFound, JobStateError, StoreError
from bulkmail.liveness import STALE_AFTER
from bulkmail.store import (
    Claimed,
    ClaimedBatch,
    DeliveryState,
    JobRecord,
    JobState,
    JobStore,
    NewDelivery,
    NewJob,
    Outcome,
    Reclaimed,
    Stop,
    Store,
    StoreReader,
    Wait,
    contract,
    message_id,
    open_reader,
    open_store,
)
from bulkmail.store import schema as schema_module
from bulkmail.store.readonly import LiteReader
from bulkmail.store.schema import schema_version
from tests.test_store import alive_at, always_alive, join, never_alive, new_job, people, start


@dataclass
class Reads:
    """A store to write through and a reader of the same store to check with."""

    store: Store
    reader: StoreReader


@pytest.fixture(params=["sqlite", "postgresql", "lite"])
def reads(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Reads]:
    """The read contract on each reader: the SQLite store, the PostgreSQL store, and the
    light sqlite3 reader of a SQLite store (opened once the test has written)."""
    if request.param == "postgresql":
        location = request.getfixturevalue("pg_url")
    else:
        location = str(tmp_path / "jobs.db")
    store = open_store(location)
    if request.param == "lite":
        reader = open_reader(location)  # it reads each time: it sees the test's writes
        assert isinstance(reader, LiteReader)
        yield Reads(store, reader)
    else:
        yield Reads(store, store)
    store.close()


# --------------------------------------------------------------------------- the contract


def test_the_store_and_the_readers_implement_the_contract(tmp_path: Path) -> None:
    """mypy checks the signatures (``sql._implements_the_contract``); this checks that no
    member of the contract is missing at run time."""

    def members(protocol: type) -> set[str]:
        own = [cls for cls in protocol.__mro__ if cls.__module__ == contract.__name__]
        return {name for cls in own for name in vars(cls) if not name.startswith("_")}

    store = open_store(tmp_path / "jobs.db")
    assert members(StoreReader) <= members(JobStore)
    assert all(hasattr(store, name) for name in members(JobStore))
    store.create_job(new_job(), people(1), now=1.0, domain="d")
    reader = open_reader(tmp_path / "jobs.db")
    assert isinstance(reader, LiteReader)
    assert all(hasattr(reader, name) for name in members(StoreReader))
    store.close()


def test_a_job_record_is_what_it_was_created_with_and_more(store: Store) -> None:
    new = new_job(dedupe_key="k")
    job = store.get_job(store.create_job(new, people(1), now=5.0, domain="d"))
    assert isinstance(job, JobRecord)
    assert {f.name: getattr(job, f.name) for f in fields(NewJob)} == {
        f.name: getattr(new, f.name) for f in fields(NewJob)
    }
    assert (job.state, job.total, job.created_at, job.started_at) == (JobState.QUEUED, 1, 5.0, None)


def test_message_ids_are_made_in_one_place(store: Store) -> None:
    assert message_id(7, 3, "ab12cd34", "example.edu") == "<bulkmail.7.3.ab12cd34@example.edu>"
    job_id = store.create_job(new_job(), people(2), now=1.0, domain="example.edu")
    token = store.get_job(job_id).token
    assert [d.message_id for d in store.deliveries(job_id)] == [
        message_id(job_id, 1, token, "example.edu"),
        message_id(job_id, 2, token, "example.edu"),
    ]


# --------------------------------------------------------------------------- reads


class TestReads:
    """``StoreReader``: on both stores and on the light reader."""

    def test_create_job_records_every_row_and_skips(self, reads: Reads) -> None:
        store, reader = reads.store, reads.reader
        job_id = store.create_job(
            new_job(), people(5, skip={1: "invalid address"}), now=10.0, domain="example.edu"
        )
        view = reader.view(job_id)
        assert view.job.state == "queued" and view.job.total == 5
        assert (view.counts.pending, view.counts.skipped) == (4, 1)
        rows = list(reader.deliveries(job_id))
        assert [d.position for d in rows] == [1, 2, 3, 4, 5]
        assert rows[1].state == "skipped" and rows[1].last_error == "invalid address"
        assert rows[0].fields == {"course": "C0"}
        ids = {d.message_id for d in rows}
        assert len(ids) == 5 and all(m.endswith("@example.edu>") for m in ids)

    def test_unknown_job(self, reads: Reads) -> None:
        with pytest.raises(JobNotFound, match="no job 42"):
            reads.reader.view(42)
        with pytest.raises(JobNotFound, match="no job 42"):
            reads.reader.get_job(42)

    def test_recent_is_newest_first_with_counts(self, reads: Reads) -> None:
        store = reads.store
        ids = [
            store.create_job(new_job(), people(n + 1), now=float(n), domain="d") for n in range(4)
        ]
        views = reads.reader.recent(3)
        assert [v.job.id for v in views] == ids[::-1][:3]
        assert [v.counts.pending for v in views] == [4, 3, 2]

    def test_deliveries_stream_in_batches_and_filter_by_state(self, reads: Reads) -> None:
        store, reader = reads.store, reads.reader
        job_id = store.create_job(new_job(), people(5, skip={3: "dup"}), now=1.0, domain="d")
        start(store, job_id)
        c = store.claim(job_id, "w1", now=100.0)
        assert isinstance(c, Claimed)
        store.record(Outcome.failed(c.delivery.id, "550 no"), "w1")
        every = list(reader.deliveries(job_id, batch=2))
        assert [d.position for d in every] == [1, 2, 3, 4, 5]
        assert every == list(store.deliveries(job_id))
        failed = list(reader.deliveries(job_id, states=(DeliveryState.FAILED,)))
        assert [(d.position, d.last_error) for d in failed] == [(1, "550 no")]
        assert [d.position for d in reader.deliveries(job_id, states=("skipped", "failed"))] == [
            1,
            4,
        ]
        counts = reader.counts(job_id)
        assert (counts.failed, counts.skipped, counts.pending, counts.total) == (1, 1, 3, 5)

    def test_taken_under_is_what_a_new_job_would_skip(self, reads: Reads) -> None:
        store = reads.store
        first = store.create_job(new_job(dedupe_key="k"), people(3), now=1.0, domain="d")
        start(store, first)
        c = store.claim(first, "w1", now=100.0)
        assert isinstance(c, Claimed)
        store.record(Outcome.sent(c.delivery.id, None, 100.0), "w1")
        store.finish_worker("w1", now=101.0, stop="paused", error=None)
        taken = reads.reader.taken_under("k")
        assert taken == {
            "p0@example.edu": (first, "sent"),
            "p1@example.edu": (first, "pending"),
            "p2@example.edu": (first, "pending"),
        }
        assert reads.reader.taken_under("other") == {}
        store.cancel(first, now=102.0)
        assert reads.reader.taken_under("k") == {"p0@example.edu": (first, "sent")}


# --------------------------------------------------------------------------- job lifecycle


class TestJobLifecycle:
    def test_a_failing_source_leaves_no_job(self, store: Store) -> None:
        def rows() -> Iterator[NewDelivery]:
            yield from people(1500)  # more than one insert batch
            raise InputError("list.csv: row 1502: template uses undefined variable 'x'")

        with pytest.raises(InputError):
            store.create_job(new_job(), rows(), now=1.0, domain="d")
        assert store.recent(10) == []
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM deliveries").scalar() == 0

    def test_a_long_address_is_stored_on_every_backend(self, store: Store) -> None:
        long = "x" * 400 + "@example.edu"
        job_id = store.create_job(
            new_job(), [NewDelivery(2, long, "n", {}, "invalid address")], now=1.0, domain="d"
        )
        assert next(iter(store.deliveries(job_id))).email == long

    def test_set_log_path(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(1), now=1.0, domain="d")
        assert store.get_job(job_id).log_path is None
        store.set_log_path(job_id, "/logs/job-1.log")
        assert store.get_job(job_id).log_path == "/logs/job-1.log"

    def test_cancel_stops_claims_and_cancels_pending(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(4), now=1.0, domain="d")
        start(store, job_id)
        c = store.claim(job_id, "w1", now=100.0)
        assert isinstance(c, Claimed)
        assert store.cancel(job_id, now=105.0) == 3
        assert store.heartbeat("w1", now=106.0) == "cancelled"
        stop = store.claim(job_id, "w1", now=106.0)
        assert isinstance(stop, Stop) and stop.state == "cancelled" and not stop.finished
        # the message in flight still gets its outcome recorded
        store.record(Outcome.sent(c.delivery.id, None, 106.0), "w1")
        assert store.finish_worker("w1", now=107.0, stop=None, error=None) == "cancelled"
        counts = store.counts(job_id)
        assert (counts.sent, counts.cancelled, counts.pending) == (1, 3, 0)
        with pytest.raises(JobStateError, match="already cancelled"):
            store.cancel(job_id, now=108.0)

    def test_cancel_of_a_crashed_job_leaves_nothing_in_flight(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        start(store, job_id, "w1")
        assert isinstance(store.claim(job_id, "w1", now=100.0), Claimed)
        # w1 was killed with its message in flight; nobody resumes, the admin cancels
        assert store.cancel(job_id, now=200.0, alive=never_alive) == 3
        counts = store.counts(job_id)
        assert (counts.sending, counts.pending, counts.cancelled) == (0, 0, 3)

    def test_retry_failed_reopens_a_completed_job(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
        start(store, job_id)
        for _ in range(2):
            c = store.claim(job_id, "w1", now=100.0)
            assert isinstance(c, Claimed)
            store.record(Outcome.failed(c.delivery.id, "550 nope"), "w1")
        assert store.finish_worker("w1", now=101.0, stop=None, error=None) == "completed"
        assert store.retry_failed(job_id) == 2
        view = store.view(job_id)
        assert view.job.state == "queued" and view.counts.pending == 2
        assert all(d.attempts == 0 for d in store.deliveries(job_id))

    def test_dedupe_key_skips_addresses_already_sent(self, store: Store) -> None:
        first = store.create_job(new_job(dedupe_key="term-1"), people(3), now=1.0, domain="d")
        start(store, first)
        for _ in range(2):  # p0 and p1 sent, p2 fails
            c = store.claim(first, "w1", now=100.0)
            assert isinstance(c, Claimed)
            store.record(Outcome.sent(c.delivery.id, None, 100.0), "w1")
        c = store.claim(first, "w1", now=100.0)
        assert isinstance(c, Claimed)
        store.record(Outcome.failed(c.delivery.id, "550"), "w1")
        upper = [NewDelivery(2, "P0@example.edu", "x", {}), *people(4)[1:]]
        second = store.create_job(new_job(dedupe_key="term-1"), upper, now=2.0, domain="d")
        rows = {d.email.lower(): d for d in store.deliveries(second)}
        assert rows["p0@example.edu"].state == "skipped"
        assert (
            rows["p0@example.edu"].last_error
            == f"already sent under dedupe key 'term-1' (job {first})"
        )
        assert rows["p1@example.edu"].state == "skipped"
        assert rows["p2@example.edu"].state == "pending"  # failed before: try again
        assert rows["p3@example.edu"].state == "pending"
        other = store.create_job(new_job(dedupe_key="term-2"), people(2), now=3.0, domain="d")
        assert store.counts(other).pending == 2

    def test_dedupe_key_skips_what_an_unfinished_job_still_holds(self, store: Store) -> None:
        first = store.create_job(new_job(dedupe_key="k"), people(3), now=1.0, domain="d")
        start(store, first)
        sent = store.claim(first, "w1", now=100.0)
        assert isinstance(sent, Claimed)
        store.record(Outcome.sent(sent.delivery.id, None, 100.0), "w1")
        # job 1 pauses with p1 and p2 pending; the next cron run must not take them too
        store.finish_worker("w1", now=101.0, stop="paused", error="server down")
        second = store.create_job(new_job(dedupe_key="k"), people(4), now=2.0, domain="d")
        reasons = {d.email: (d.state, d.last_error) for d in store.deliveries(second)}
        assert reasons["p0@example.edu"] == (
            "skipped",
            f"already sent under dedupe key 'k' (job {first})",
        )
        assert reasons["p1@example.edu"][0] == "skipped"
        assert f"already queued under dedupe key 'k' in job {first}" in str(
            reasons["p1@example.edu"][1]
        )
        assert reasons["p3@example.edu"] == ("pending", None)


# --------------------------------------------------------------------------- worker leases


class TestWorkerLeases:
    def test_dead_workers_sending_deliveries_are_in_doubt_on_resume(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        start(store, job_id, "w1")
        claimed = store.claim(job_id, "w1", now=100.0)
        assert isinstance(claimed, Claimed)
        # w1 dies here (kill -9): the delivery stays 'sending'
        with pytest.raises(JobStateError, match="being run by worker pid 1"):
            store.register_worker(
                job_id, worker_id="w2", host="h", pid=2, now=110.0, alive=always_alive
            )
        reg = store.register_worker(
            job_id, worker_id="w2", host="h", pid=2, now=110.0, alive=never_alive
        )
        assert reg.reclaimed == 1
        again = store.claim(job_id, "w2", now=110.0)
        assert isinstance(again, Claimed)
        assert again.delivery.id == claimed.delivery.id
        assert again.delivery.message_id == claimed.delivery.message_id
        assert again.delivery.in_doubt
        assert store.counts(job_id).in_doubt == 1
        workers = {w.id: w for w in store.view(job_id).workers}
        assert workers["w1"].stopped_at == 110.0 and workers["w2"].stopped_at is None

    def test_pause_keeps_pending_and_records_why(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
        start(store, job_id)
        c = store.claim(job_id, "w1", now=100.0)
        assert isinstance(c, Claimed)
        store.release(c.delivery.id, "w1")
        state = store.finish_worker("w1", now=101.0, stop="aborted", error="535 login rejected")
        assert state == "aborted"
        view = store.view(job_id)
        assert view.counts.pending == 2 and view.job.error == "535 login rejected"
        assert all(d.attempts == 0 for d in store.deliveries(job_id))

    def test_a_worker_taken_for_gone_claims_nothing_more(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        start(store, job_id, "w1", now=100.0)
        store.register_worker(
            job_id, worker_id="w2", host="h", pid=2, now=100.0, alive=always_alive, exclusive=False
        )
        # w1's heartbeat went stale: w2 reclaims and marks it stopped
        store.reclaim(job_id, worker_id="w2", now=200.0, alive=lambda w: w.id == "w2")
        stop = store.claim(job_id, "w1", now=200.0)
        assert isinstance(stop, Stop) and stop.state == "stopped"
        assert isinstance(store.claim(job_id, "w2", now=200.0), Claimed)

    def test_workers_join_a_job_that_resume_would_refuse(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        join(store, job_id, "w1", 100.0)
        join(store, job_id, "w2", 101.0)  # additive: w1 is alive and stays
        with pytest.raises(JobStateError, match="being run by worker pid 1000 on host-w1"):
            store.register_worker(
                job_id, worker_id="w3", host="h", pid=3, now=102.0, alive=alive_at(102.0)
            )
        view = store.view(job_id)
        assert [w.id for w in view.workers if w.stopped_at is None] == ["w1", "w2"]

    def test_a_silent_workers_deliveries_are_reclaimed_never_a_slow_ones(
        self, store: Store
    ) -> None:
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
        assert store.record(Outcome.sent(first.delivery.id, None, 160.0), "slow")
        second = store.claim(job_id, "slow", now=160.0)
        assert isinstance(second, Claimed)
        # ... and now 'slow' goes silent (kill -9, a lost host): its heartbeat stays at 160
        now = 160.0 + STALE_AFTER  # not yet stale
        assert store.reclaim(job_id, worker_id="live", now=now, alive=alive_at(now)).reclaimed == 0
        now += 1.0
        held = store.reclaim(job_id, worker_id="live", now=now, alive=alive_at(now))
        assert (held.reclaimed, held.elsewhere) == (1, 0)
        # the silent worker can no longer record an outcome for it, and learns it was replaced
        assert not store.record(Outcome.sent(second.delivery.id, None, now), "slow")
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
            Reclaimed(0, 0)
        )
        assert store.counts(job_id).sending == 1

    def test_reclaim_leaves_a_job_that_is_not_running_alone(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
        join(store, job_id, "w1", 100.0)
        join(store, job_id, "w2", 100.0)
        assert isinstance(store.claim(job_id, "w1", now=100.0), Claimed)
        store.cancel(job_id, now=101.0)
        held = store.reclaim(job_id, worker_id="w2", now=1000.0, alive=alive_at(1000.0))
        assert (held.reclaimed, held.elsewhere) == (0, 0)
        assert store.counts(job_id).sending == 1


# --------------------------------------------------------------------------- claims


class TestClaims:
    def test_claim_marks_sending_and_outcomes_are_recorded(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        assert isinstance(store.claim(job_id, "w1", now=100.0), Stop)  # not running yet
        start(store, job_id)
        first = store.claim(job_id, "w1", now=100.0)
        assert isinstance(first, Claimed)
        d = first.delivery
        assert (d.position, d.state, d.attempts, d.worker_id) == (1, "sending", 1, "w1")
        assert store.counts(job_id).sending == 1
        assert store.record(Outcome.sent(d.id, "abc", 101.0), "w1")
        # a worker that no longer owns the delivery cannot overwrite its outcome
        assert not store.record(Outcome.failed(d.id, "late"), "w2")
        second = store.claim(job_id, "w1", now=101.0)
        assert isinstance(second, Claimed)
        store.record(Outcome.retry(second.delivery.id, "451 later", 200.0), "w1")
        third = store.claim(job_id, "w1", now=101.0)
        assert isinstance(third, Claimed) and third.delivery.position == 3
        store.record(Outcome.failed(third.delivery.id, "550 no such user"), "w1")
        wait = store.claim(job_id, "w1", now=150.0)
        assert isinstance(wait, Wait) and wait.seconds == pytest.approx(50.0)
        assert store.next_due(job_id, now=150.0) == pytest.approx(50.0)
        again = store.claim(job_id, "w1", now=200.0)
        assert isinstance(again, Claimed) and again.delivery.attempts == 2
        store.record(Outcome.sent(again.delivery.id, None, 201.0), "w1")
        done = store.claim(job_id, "w1", now=300.0)
        assert isinstance(done, Stop) and done.finished
        assert store.next_due(job_id, now=300.0) is None
        assert store.finish_worker("w1", now=301.0, stop=None, error=None) == "completed"
        view = store.view(job_id)
        assert (view.counts.sent, view.counts.failed) == (2, 1)
        assert view.job.finished_at == 301.0
        assert view.workers[0].sent == 2

    def test_a_claim_settles_the_previous_outcome_first(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
        start(store, job_id)
        first = store.claim(job_id, "w1", now=100.0)
        assert isinstance(first, Claimed)
        settle = Outcome.sent(first.delivery.id, "m1", 100.5)
        second = store.claim(job_id, "w1", now=101.0, settle=settle)
        assert isinstance(second, Claimed) and second.delivery.position == 2
        sent = next(iter(store.deliveries(job_id, states=("sent",))))
        assert (sent.id, sent.provider_message_id, sent.sent_at) == (first.delivery.id, "m1", 100.5)
        assert store.view(job_id).workers[0].sent == 1

    def test_a_retry_or_release_after_cancel_is_cancelled_not_pending(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        start(store, job_id, "w1")
        a = store.claim(job_id, "w1", now=100.0)
        b = store.claim(job_id, "w1", now=100.0)
        assert isinstance(a, Claimed) and isinstance(b, Claimed)
        store.cancel(job_id, now=101.0, alive=always_alive)
        store.record(Outcome.retry(a.delivery.id, "451 later", 500.0), "w1")
        store.release(b.delivery.id, "w1")
        counts = store.counts(job_id)
        assert (counts.pending, counts.sending, counts.cancelled) == (0, 0, 3)

    def test_claim_skips_an_address_another_job_under_the_key_has_sent(self, store: Store) -> None:
        first = store.create_job(new_job(dedupe_key="k"), people(2), now=1.0, domain="d")
        start(store, first, "w1")
        for _ in range(2):
            c = store.claim(first, "w1", now=100.0)
            assert isinstance(c, Claimed)
            store.record(Outcome.failed(c.delivery.id, "550 full"), "w1")
        store.finish_worker("w1", now=101.0, stop=None, error=None)
        second = store.create_job(new_job(dedupe_key="k"), people(1), now=2.0, domain="d")
        start(store, second, "w2")
        c = store.claim(second, "w2", now=102.0)
        assert isinstance(c, Claimed)
        store.record(Outcome.sent(c.delivery.id, None, 102.0), "w2")
        # `retry 1` later: p0 was reminded by job 2 in the meantime, p1 was not
        store.retry_failed(first)
        start(store, first, "w3")
        again = store.claim(first, "w3", now=103.0)
        assert isinstance(again, Claimed) and again.delivery.email == "p1@example.edu"
        p0 = next(d for d in store.deliveries(first) if d.email == "p0@example.edu")
        assert (p0.state, p0.last_error) == (
            "skipped",
            f"already sent under dedupe key 'k' (job {second})",
        )


# --------------------------------------------------------------------------- schema versions


def _version(store: Store) -> int | None:
    with store.engine.connect() as conn:
        return schema_version(conn)


class TestSchema:
    def test_a_store_without_a_recorded_version_is_upgraded(self, store_url: str) -> None:
        s = open_store(store_url)
        job_id = s.create_job(new_job(), people(2), now=1.0, domain="d")
        with s.engine.begin() as conn:  # as a store made before versions were recorded
            conn.execute(sa.text("DROP TABLE meta"))
        assert _version(s) == 0
        s.close()
        s = open_store(store_url)
        assert _version(s) == schema_module.SCHEMA_VERSION
        assert s.counts(job_id).pending == 2
        s.close()

    def test_migrations_run_in_order_in_one_transaction(
        self, store_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        s = open_store(store_url)
        job_id = s.create_job(new_job(), people(1), now=1.0, domain="d")
        s.close()
        version = schema_module.SCHEMA_VERSION

        def add_column(conn: sa.Connection) -> None:
            conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN note TEXT"))

        def broken(conn: sa.Connection) -> None:
            conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN other TEXT"))
            raise RuntimeError("step failed")

        monkeypatch.setattr(schema_module, "SCHEMA_VERSION", version + 1)
        monkeypatch.setitem(schema_module.MIGRATIONS, version, add_column)
        s = open_store(store_url)
        assert _version(s) == version + 1
        columns = {c["name"] for c in sa.inspect(s.engine).get_columns("jobs")}
        assert "note" in columns
        assert s.get_job(job_id).total == 1
        s.close()
        # a failing step leaves the store exactly as it was
        monkeypatch.setattr(schema_module, "SCHEMA_VERSION", version + 2)
        monkeypatch.setitem(schema_module.MIGRATIONS, version + 1, broken)
        with pytest.raises(RuntimeError, match="step failed"):
            open_store(store_url)
        monkeypatch.setattr(schema_module, "SCHEMA_VERSION", version + 1)
        s = open_store(store_url)
        assert _version(s) == version + 1
        assert "other" not in {c["name"] for c in sa.inspect(s.engine).get_columns("jobs")}
        s.close()
        # and an older bulkmail refuses a store a newer one has upgraded
        monkeypatch.setattr(schema_module, "SCHEMA_VERSION", version)
        with pytest.raises(StoreError, match="made by a newer bulkmail"):
            open_store(store_url)


# --------------------------------------------------------------------------- API tokens


class TestTokens:
    def test_a_token_is_stored_by_its_hash_and_removed(self, store: Store) -> None:
        store.add_token("office", "a" * 64, "sender", now=3.0)
        store.add_token("auditor", "b" * 64, "viewer", now=4.0)
        assert [(t.name, t.role, t.created_at) for t in store.tokens()] == [
            ("auditor", "viewer", 4.0),
            ("office", "sender", 3.0),
        ]
        found = store.token_by_hash("a" * 64)
        assert found is not None and (found.name, found.role) == ("office", "sender")
        assert store.token_by_hash("c" * 64) is None
        assert store.remove_token("office") is True
        assert store.remove_token("office") is False
        assert store.token_by_hash("a" * 64) is None

    def test_a_taken_name_or_an_unknown_role_is_refused(self, store: Store) -> None:
        store.add_token("office", "a" * 64, "sender", now=3.0)
        with pytest.raises(InputError, match="exists already"):
            store.add_token("office", "b" * 64, "viewer", now=4.0)
        with pytest.raises(InputError, match="--role: must be one of viewer, sender"):
            store.add_token("other", "c" * 64, "admin", now=4.0)
        assert [t.name for t in store.tokens()] == ["office"]

    def test_a_job_records_who_created_it(self, store: Store) -> None:
        job_id = store.create_job(new_job(created_by="office"), people(1), now=1.0, domain="d")
        assert store.get_job(job_id).created_by == "office"
        assert (
            store.get_job(store.create_job(new_job(), people(1), now=1.0, domain="d")).created_by
            is None
        )


def test_a_store_of_schema_3_gains_tokens_and_created_by(store_url: str) -> None:
    s = open_store(store_url)
    job_id = s.create_job(new_job(), people(1), now=1.0, domain="d")
    with s.engine.begin() as conn:  # what schema 3 looked like
        conn.execute(sa.text("DROP TABLE api_tokens"))
        conn.execute(sa.text("ALTER TABLE jobs DROP COLUMN created_by"))
        conn.execute(sa.text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    s.close()
    s = open_store(store_url)
    assert _version(s) == schema_module.SCHEMA_VERSION
    assert s.get_job(job_id).created_by is None
    s.add_token("office", "a" * 64, "sender", now=2.0)
    assert [t.name for t in s.tokens()] == ["office"]
    s.close()


# --------------------------------------------------------------------------- the caps' log


class TestWhatCountsTowardsTheCaps:
    """The hourly and daily caps count what the provider may have counted: every claim in
    flight, in doubt, sent or refused; never a claim given back untried (issue 12)."""

    T0 = 1_800_000_000.0

    @pytest.fixture
    def clock(self, store: Store) -> Iterator[list[float]]:
        now = [self.T0]
        store.clock = lambda: now[0]  # the store's time (the database's clock otherwise)
        yield now
        store.clock = None

    def capped(self, store: Store, n: int, per_hour: int) -> int:
        job_id = store.create_job(new_job(per_hour=per_hour), people(n), now=1.0, domain="d")
        start(store, job_id, now=self.T0)
        return job_id

    @staticmethod
    def now(store: Store) -> float:
        assert store.clock is not None
        return store.clock()

    def take(self, store: Store, job_id: int, worker: str = "w1") -> int:
        got = store.claim(job_id, worker, now=self.now(store))
        assert isinstance(got, Claimed), got
        return got.delivery.id

    def held(self, store: Store, job_id: int, worker: str = "w1") -> str:
        got = store.claim(job_id, worker, now=self.now(store))
        assert isinstance(got, Wait), got
        return got.why or ""

    def test_a_released_claim_leaves_room(self, store: Store, clock: list[float]) -> None:
        job_id = self.capped(store, 5, per_hour=2)
        first = self.take(store, job_id)
        assert store.release(first, "w1")  # e.g. Ctrl-C while it waited for its rate slot
        again = self.take(store, job_id)
        assert again == first  # the same delivery, claimed afresh
        self.take(store, job_id)
        assert self.held(store, job_id) == "hourly cap 2/2 on outbox:/tmp/x"

    def test_sent_refused_and_in_doubt_count_given_back_does_not(
        self, store: Store, clock: list[float]
    ) -> None:
        job_id = self.capped(store, 8, per_hour=4)
        sent, refused, retried, in_doubt = (self.take(store, job_id) for _ in range(4))
        store.record(Outcome.sent(sent, "p1", self.T0), "w1")
        store.record(Outcome.failed(refused, "550 5.1.1 no such user"), "w1")  # a 5xx counts
        store.record(Outcome.retry(retried, "451 4.3.0 try later", self.T0 + 1), "w1")
        store.record(Outcome.retry(in_doubt, "lost after DATA", self.T0, in_doubt=True), "w1")
        assert self.held(store, job_id) == "hourly cap 4/4 on outbox:/tmp/x"
        # a retried one again, then refused as too fast (or the server unreachable): the
        # attempt is given back (``attempts``) and so is its place in the hour
        clock[0] = self.T0 + 3600.5  # the first four left the hour
        again = self.take(store, job_id)
        throttled = Outcome.retry(again, "450 4.7.1 slow down", clock[0], attempts=0)
        assert throttled.given_back
        assert store.record(throttled, "w1")  # so four more fit, not three
        ids = {self.take(store, job_id) for _ in range(4)}
        assert len(ids) == 4
        assert self.held(store, job_id) == "hourly cap 4/4 on outbox:/tmp/x"

    def test_an_in_doubt_throttling_reply_still_counts(
        self, store: Store, clock: list[float]
    ) -> None:
        job_id = self.capped(store, 3, per_hour=1)
        d = self.take(store, job_id)
        outcome = Outcome.retry(d, "429 after the body was sent", self.T0, True, attempts=0)
        assert not outcome.given_back
        store.record(outcome, "w1")
        assert self.held(store, job_id) == "hourly cap 1/1 on outbox:/tmp/x"

    def test_a_sent_message_counts_from_when_it_went_out(
        self, store: Store, clock: list[float]
    ) -> None:
        """Claimed at T0, sent at T0 + 100 (a slow connection): the hour it fills ends at
        T0 + 3700, so a message claimed at T0 + 3650 cannot reach the server within an
        hour of it."""
        job_id = self.capped(store, 3, per_hour=1)
        d = self.take(store, job_id)
        clock[0] = self.T0 + 100
        store.record(Outcome.sent(d, "p1", clock[0]), "w1")
        clock[0] = self.T0 + 3650
        got = store.claim(job_id, "w1", now=clock[0])
        assert isinstance(got, Wait) and got.seconds == pytest.approx(50)
        clock[0] = self.T0 + 3700.5
        assert isinstance(store.claim(job_id, "w1", now=clock[0]), Claimed)

    def test_a_fenced_worker_takes_its_claim_out_not_the_new_owners(
        self, store: Store, clock: list[float]
    ) -> None:
        """w1 froze past its lease holding a delivery; w2 took it over (in doubt) and
        claimed it again. w1's fence stops it before the send, and its release changes
        nothing of the delivery but takes w1's claim out of the hour: w2's stays."""
        job_id = self.capped(store, 4, per_hour=2)
        d = self.take(store, job_id, "w1")
        store.register_worker(
            job_id, worker_id="w2", host="h2", pid=2, now=self.T0, alive=never_alive,
            exclusive=False,
        )  # fmt: skip
        assert self.take(store, job_id, "w2") == d  # in doubt, w2's now
        assert self.held(store, job_id, "w2") == "hourly cap 2/2 on outbox:/tmp/x"
        assert not store.release(d, "w1")  # not w1's any more
        [mine] = [x for x in store.deliveries(job_id) if x.id == d]
        assert (mine.state, mine.worker_id, mine.in_doubt) == ("sending", "w2", True)
        self.take(store, job_id, "w2")  # the room w1's claim held
        assert self.held(store, job_id, "w2") == "hourly cap 2/2 on outbox:/tmp/x"

    def test_a_schema_7_store_gains_the_claims_columns(self, store_url: str) -> None:
        s = open_store(store_url)
        with s.engine.begin() as conn:  # what schema 7 looked like
            conn.execute(sa.text("DROP INDEX ix_sends_delivery"))
            conn.execute(sa.text("ALTER TABLE sends DROP COLUMN delivery_id"))
            conn.execute(sa.text("ALTER TABLE sends DROP COLUMN worker_id"))
            conn.execute(sa.text("INSERT INTO sends (account, at) VALUES ('a', 5.0)"))
            conn.execute(sa.text("UPDATE meta SET value = '7' WHERE key = 'schema_version'"))
        s.close()
        s = open_store(store_url)
        assert _version(s) == schema_module.SCHEMA_VERSION
        with s.engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("sends")}
            indexes = {i["name"] for i in sa.inspect(conn).get_indexes("sends")}
            old = conn.execute(sa.text("SELECT delivery_id, worker_id FROM sends")).all()
        assert {"delivery_id", "worker_id"} <= columns and "ix_sends_delivery" in indexes
        assert [tuple(r) for r in old] == [(None, None)]  # an older row counts as before
        s.close()


def test_the_account_sends_the_caps_count_are_read_for_a_calendar(reads: Reads) -> None:
    store = reads.store
    job_id = store.create_job(new_job(per_day=9), people(3), now=1.0, domain="d")
    other = store.create_job(new_job(account="smtp:else"), people(1), now=1.0, domain="d")
    start(store, job_id, now=100.0)
    start(store, other, worker="w2", now=100.0)
    clock = [0.0]
    store.clock = lambda: clock[0]  # the store's time (the database's clock otherwise)
    try:
        for now in (150.0, 250.0):
            clock[0] = now
            assert isinstance(store.claim(job_id, "w1", now=now), Claimed)
        clock[0] = 260.0
        assert isinstance(store.claim(other, "w2", now=260.0), Claimed)
    finally:
        store.clock = None
    assert reads.reader.account_sends("outbox:/tmp/x", since=0.0) == [150.0, 250.0]
    assert reads.reader.account_sends("outbox:/tmp/x", since=150.0) == [250.0]
    assert reads.reader.account_sends("nobody", since=0.0) == []


# --------------------------------------------------------------------------- suppressed later


class TestSuppressedAtClaim:
    """An address put on the suppression list after the job was created (a complaint, an
    unsubscribe, a hard bounce, `suppress add` while it runs or waits) is skipped by the
    claim, with the reason creation gives, unless the job includes suppressed addresses."""

    DEC_1 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC).timestamp()

    def claim_all(self, store: Store, job_id: int, *, batch: int = 1) -> list[str]:
        """Claim and send every due delivery; the addresses claimed, in order."""
        got: list[str] = []
        while True:
            if batch == 1:
                one = store.claim(job_id, "w1", now=200.0)
                claimed = [one.delivery] if isinstance(one, Claimed) else []
                end: object = one
            else:
                many = store.claim_batch(job_id, "w1", now=200.0, limit=batch)
                claimed = list(many.deliveries) if isinstance(many, ClaimedBatch) else []
                end = many
            if not claimed:
                assert isinstance(end, Stop) and end.finished
                return got
            for d in claimed:
                store.record(Outcome.sent(d.id, f"p-{d.position}", 200.0), "w1")
                got.append(d.email)

    @pytest.mark.parametrize("batch", [1, 2])
    def test_a_claim_skips_an_address_suppressed_since_creation(
        self, store: Store, batch: int
    ) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        start(store, job_id)
        assert (
            store.add_suppression("P1@Example.EDU", reason="complained", now=self.DEC_1, job_id=7)
            is None
        )
        assert self.claim_all(store, job_id, batch=batch) == ["p0@example.edu", "p2@example.edu"]
        states = {d.email: (d.state, d.last_error, d.attempts) for d in store.deliveries(job_id)}
        assert states["p1@example.edu"] == (
            "skipped",
            "suppressed: complained 2026-12-01 in job 7",
            0,
        )
        counts = store.counts(job_id)
        assert (counts.sent, counts.skipped, counts.pending) == (2, 1, 0)
        assert store.get_job(job_id).include_suppressed is False
        assert store.finish_worker("w1", now=300.0, stop=None, error=None) == JobState.COMPLETED
        assert store.get_job(job_id).state == JobState.COMPLETED

    def test_a_job_made_with_include_suppressed_still_sends_to_it(self, store: Store) -> None:
        job_id = store.create_job(
            new_job(), people(3), now=1.0, domain="d", include_suppressed=True
        )
        assert store.get_job(job_id).include_suppressed is True
        start(store, job_id)
        store.add_suppression("p1@example.edu", reason="bounced", now=self.DEC_1)
        assert self.claim_all(store, job_id) == [f"p{i}@example.edu" for i in range(3)]
        assert store.counts(job_id).skipped == 0

    def test_a_schema_8_store_gains_include_suppressed_false(self, store_url: str) -> None:
        s = open_store(store_url)
        job_id = s.create_job(new_job(), people(2), now=1.0, domain="d")
        with s.engine.begin() as conn:  # what schema 8 looked like
            conn.execute(sa.text("ALTER TABLE jobs DROP COLUMN include_suppressed"))
            conn.execute(sa.text("UPDATE meta SET value = '8' WHERE key = 'schema_version'"))
        s.close()
        s = open_store(store_url)
        assert _version(s) == schema_module.SCHEMA_VERSION
        assert s.get_job(job_id).include_suppressed is False  # checked at creation: the safe side
        start(s, job_id)
        s.add_suppression("p0@example.edu", reason="unsubscribed", now=self.DEC_1)
        assert self.claim_all(s, job_id) == ["p1@example.edu"]
        s.close()
