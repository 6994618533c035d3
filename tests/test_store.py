"""The job store on real SQLite files: creation, claims, outcomes, workers, commands."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkmail.errors import InputError, JobNotFound, JobStateError, StoreError
from bulkmail.store import (
    Claimed,
    NewDelivery,
    NewJob,
    Stop,
    Store,
    Wait,
    WorkerRecord,
    open_store,
)


def new_job(**overrides: object) -> NewJob:
    values: dict[str, object] = dict(
        provider="outbox",
        provider_settings={"dir": "/tmp/x"},
        account="outbox:/tmp/x",
        sender="Office <office@example.edu>",
        subject="Hi {{ name }}",
        templates={"text": "Hello {{ name }}", "html": None, "attachments": []},
        source="list.csv",
        rate=0.0,
        burst=1,
        concurrency=1,
        max_retries=3,
        backoff=5.0,
        dedupe_key=None,
    )
    values.update(overrides)
    return NewJob(**values)  # type: ignore[arg-type]


def people(n: int, *, skip: dict[int, str] | None = None) -> list[NewDelivery]:
    skip = skip or {}
    return [
        NewDelivery(i + 2, f"p{i}@example.edu", f"Person {i}", {"course": f"C{i}"}, skip.get(i))
        for i in range(n)
    ]


def never_alive(_w: WorkerRecord) -> bool:
    return False


def always_alive(_w: WorkerRecord) -> bool:
    return True


def start(store: Store, job_id: int, worker: str = "w1", now: float = 100.0) -> None:
    store.register_worker(job_id, worker_id=worker, host="h", pid=1, now=now, alive=never_alive)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """The contract: every test taking ``store`` runs on SQLite and on PostgreSQL."""
    s = open_store(store_url)
    yield s
    s.close()


def test_store_file_is_private_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "jobs.db"
    s = open_store(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_not_a_store_is_one_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("this is not sqlite " * 100)
    with pytest.raises(StoreError, match="not a bulkmail job store"):
        open_store(bogus)


def test_create_job_records_every_row_and_skips(store: Store) -> None:
    job_id = store.create_job(
        new_job(), people(5, skip={1: "invalid address"}), now=10.0, domain="example.edu"
    )
    view = store.view(job_id)
    assert view.job.state == "queued" and view.job.total == 5
    assert (view.counts.pending, view.counts.skipped) == (4, 1)
    rows = list(store.deliveries(job_id))
    assert [d.position for d in rows] == [1, 2, 3, 4, 5]
    assert rows[1].state == "skipped" and rows[1].last_error == "invalid address"
    assert rows[0].fields == {"course": "C0"}
    ids = {d.message_id for d in rows}
    assert len(ids) == 5 and all(m.endswith("@example.edu>") for m in ids)


def test_a_failing_source_leaves_no_job(store: Store) -> None:
    def rows():  # type: ignore[no-untyped-def]
        yield from people(1500)  # more than one insert batch
        raise InputError("list.csv: row 1502: template uses undefined variable 'x'")

    with pytest.raises(InputError):
        store.create_job(new_job(), rows(), now=1.0, domain="d")
    assert store.recent(10) == []
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM deliveries").scalar() == 0


def test_unknown_job(store: Store) -> None:
    with pytest.raises(JobNotFound, match="no job 42"):
        store.view(42)


def test_claim_marks_sending_and_outcomes_are_recorded(store: Store) -> None:
    job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
    assert isinstance(store.claim(job_id, "w1", now=100.0), Stop)  # not running yet
    start(store, job_id)
    first = store.claim(job_id, "w1", now=100.0)
    assert isinstance(first, Claimed)
    d = first.delivery
    assert (d.position, d.state, d.attempts, d.worker_id) == (1, "sending", 1, "w1")
    assert store.counts(job_id).sending == 1
    assert store.record_sent(d.id, "w1", provider_message_id="abc", now=101.0)
    # a worker that no longer owns the delivery cannot overwrite its outcome
    assert not store.record_failed(d.id, "w2", error="late")
    second = store.claim(job_id, "w1", now=101.0)
    assert isinstance(second, Claimed)
    store.record_retry(second.delivery.id, "w1", error="451 later", next_attempt_at=200.0)
    third = store.claim(job_id, "w1", now=101.0)
    assert isinstance(third, Claimed) and third.delivery.position == 3
    store.record_failed(third.delivery.id, "w1", error="550 no such user")
    wait = store.claim(job_id, "w1", now=150.0)
    assert isinstance(wait, Wait) and wait.seconds == pytest.approx(50.0)
    assert store.next_due(job_id, now=150.0) == pytest.approx(50.0)
    again = store.claim(job_id, "w1", now=200.0)
    assert isinstance(again, Claimed) and again.delivery.attempts == 2
    store.record_sent(again.delivery.id, "w1", provider_message_id=None, now=201.0)
    done = store.claim(job_id, "w1", now=300.0)
    assert isinstance(done, Stop) and done.finished
    assert store.next_due(job_id, now=300.0) is None
    assert store.finish_worker("w1", now=301.0, stop=None, error=None) == "completed"
    view = store.view(job_id)
    assert (view.counts.sent, view.counts.failed) == (2, 1)
    assert view.job.finished_at == 301.0
    assert view.workers[0].sent == 2


def test_dead_workers_sending_deliveries_are_in_doubt_on_resume(store: Store) -> None:
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


def test_cancel_stops_claims_and_cancels_pending(store: Store) -> None:
    job_id = store.create_job(new_job(), people(4), now=1.0, domain="d")
    start(store, job_id)
    c = store.claim(job_id, "w1", now=100.0)
    assert isinstance(c, Claimed)
    assert store.cancel(job_id, now=105.0) == 3
    assert store.heartbeat("w1", now=106.0) == "cancelled"
    stop = store.claim(job_id, "w1", now=106.0)
    assert isinstance(stop, Stop) and stop.state == "cancelled" and not stop.finished
    # the message in flight still gets its outcome recorded
    store.record_sent(c.delivery.id, "w1", provider_message_id=None, now=106.0)
    assert store.finish_worker("w1", now=107.0, stop=None, error=None) == "cancelled"
    counts = store.counts(job_id)
    assert (counts.sent, counts.cancelled, counts.pending) == (1, 3, 0)
    with pytest.raises(JobStateError, match="already cancelled"):
        store.cancel(job_id, now=108.0)


def test_retry_failed_reopens_a_completed_job(store: Store) -> None:
    job_id = store.create_job(new_job(), people(2), now=1.0, domain="d")
    start(store, job_id)
    for _ in range(2):
        c = store.claim(job_id, "w1", now=100.0)
        assert isinstance(c, Claimed)
        store.record_failed(c.delivery.id, "w1", error="550 nope")
    assert store.finish_worker("w1", now=101.0, stop=None, error=None) == "completed"
    assert store.retry_failed(job_id) == 2
    view = store.view(job_id)
    assert view.job.state == "queued" and view.counts.pending == 2
    assert all(d.attempts == 0 for d in store.deliveries(job_id))


def test_pause_keeps_pending_and_records_why(store: Store) -> None:
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


def test_dedupe_key_skips_addresses_already_sent(store: Store) -> None:
    first = store.create_job(new_job(dedupe_key="term-1"), people(3), now=1.0, domain="d")
    start(store, first)
    for _ in range(2):  # p0 and p1 sent, p2 fails
        c = store.claim(first, "w1", now=100.0)
        assert isinstance(c, Claimed)
        store.record_sent(c.delivery.id, "w1", provider_message_id=None, now=100.0)
    c = store.claim(first, "w1", now=100.0)
    assert isinstance(c, Claimed)
    store.record_failed(c.delivery.id, "w1", error="550")
    upper = [NewDelivery(2, "P0@example.edu", "x", {}), *people(4)[1:]]
    second = store.create_job(new_job(dedupe_key="term-1"), upper, now=2.0, domain="d")
    rows = {d.email.lower(): d for d in store.deliveries(second)}
    assert rows["p0@example.edu"].state == "skipped"
    assert (
        rows["p0@example.edu"].last_error == f"already sent under dedupe key 'term-1' (job {first})"
    )
    assert rows["p1@example.edu"].state == "skipped"
    assert rows["p2@example.edu"].state == "pending"  # failed before: try again
    assert rows["p3@example.edu"].state == "pending"
    other = store.create_job(new_job(dedupe_key="term-2"), people(2), now=3.0, domain="d")
    assert store.counts(other).pending == 2


def test_recent_is_newest_first_with_counts(store: Store) -> None:
    ids = [store.create_job(new_job(), people(n + 1), now=float(n), domain="d") for n in range(4)]
    views = store.recent(3)
    assert [v.job.id for v in views] == ids[::-1][:3]
    assert [v.counts.pending for v in views] == [4, 3, 2]


def test_the_store_never_holds_a_secret(tmp_path: Path) -> None:
    from bulkmail.config import load_settings

    settings = load_settings(
        env={"BULKMAIL_SMTP_PASSWORD": "hunter2-secret", "BULKMAIL_MAILTRAP_TOKEN": "tok-secret"}
    )
    path = tmp_path / "s.db"
    s = open_store(path)
    for provider in ("smtp", "mailtrap"):
        s.create_job(
            new_job(provider=provider, provider_settings=settings.provider_public(provider)),
            people(1),
            now=1.0,
            domain="d",
        )
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("s.db"))
    assert b"hunter2-secret" not in raw and b"tok-secret" not in raw
    assert os.path.getsize(path) > 0


def test_cancel_of_a_crashed_job_leaves_nothing_in_flight(store: Store) -> None:
    job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
    start(store, job_id, "w1")
    assert isinstance(store.claim(job_id, "w1", now=100.0), Claimed)
    # w1 was killed with its message in flight; nobody resumes, the admin cancels
    assert store.cancel(job_id, now=200.0, alive=never_alive) == 3
    counts = store.counts(job_id)
    assert (counts.sending, counts.pending, counts.cancelled) == (0, 0, 3)


def test_a_retry_or_release_after_cancel_is_cancelled_not_pending(store: Store) -> None:
    job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
    start(store, job_id, "w1")
    a = store.claim(job_id, "w1", now=100.0)
    b = store.claim(job_id, "w1", now=100.0)
    assert isinstance(a, Claimed) and isinstance(b, Claimed)
    store.cancel(job_id, now=101.0, alive=always_alive)
    store.record_retry(a.delivery.id, "w1", error="451 later", next_attempt_at=500.0)
    store.release(b.delivery.id, "w1")
    counts = store.counts(job_id)
    assert (counts.pending, counts.sending, counts.cancelled) == (0, 0, 3)


def test_a_worker_taken_for_gone_claims_nothing_more(store: Store) -> None:
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


def test_dedupe_key_skips_what_an_unfinished_job_still_holds(store: Store) -> None:
    first = store.create_job(new_job(dedupe_key="k"), people(3), now=1.0, domain="d")
    start(store, first)
    sent = store.claim(first, "w1", now=100.0)
    assert isinstance(sent, Claimed)
    store.record_sent(sent.delivery.id, "w1", provider_message_id=None, now=100.0)
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


def test_claim_skips_an_address_another_job_under_the_key_has_sent(store: Store) -> None:
    first = store.create_job(new_job(dedupe_key="k"), people(2), now=1.0, domain="d")
    start(store, first, "w1")
    for _ in range(2):
        c = store.claim(first, "w1", now=100.0)
        assert isinstance(c, Claimed)
        store.record_failed(c.delivery.id, "w1", error="550 full")
    store.finish_worker("w1", now=101.0, stop=None, error=None)
    second = store.create_job(new_job(dedupe_key="k"), people(1), now=2.0, domain="d")
    start(store, second, "w2")
    c = store.claim(second, "w2", now=102.0)
    assert isinstance(c, Claimed)
    store.record_sent(c.delivery.id, "w2", provider_message_id=None, now=102.0)
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
