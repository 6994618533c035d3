"""The worker's store retry (bulkmail.storeretry): a store error is retried with a doubling
backoff up to the stale window, on an injected clock (no real waiting)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bulkmail.errors import JobNotFound, StoreError
from bulkmail.manager import EmailManager
from bulkmail.providers.base import Provider
from bulkmail.store import JobRecord, NewJob, Outcome, open_store
from bulkmail.storeretry import RetryingStore, retry_store_errors, retrying


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int, result: str = "ok") -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise StoreError(f"server closed the connection unexpectedly ({len(calls)})")
        return result

    return calls, call


def test_a_store_error_is_retried_with_a_doubling_delay_capped_at_two_seconds() -> None:
    clock = FakeClock()
    calls, call = failing(7)
    got = retry_store_errors(call, what="claim", give_up_after=15.0, clock=clock, sleep=clock.sleep)
    assert got == "ok"
    assert len(calls) == 8
    assert clock.sleeps == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_it_gives_up_after_the_stale_window_with_the_last_error() -> None:
    clock = FakeClock()
    calls, call = failing(1000)
    with pytest.raises(StoreError, match="unexpectedly"):
        retry_store_errors(call, what="record", give_up_after=15.0, clock=clock, sleep=clock.sleep)
    # never waits past the window: the last sleep is cut to what is left of it
    assert sum(clock.sleeps) == pytest.approx(15.0)
    assert max(clock.sleeps) <= 2.0
    assert len(calls) == len(clock.sleeps) + 1


def test_a_success_needs_no_wait_and_other_errors_are_not_retried() -> None:
    clock = FakeClock()
    assert retry_store_errors(lambda: 7, what="x", give_up_after=15.0, clock=clock,
                              sleep=clock.sleep) == 7  # fmt: skip
    assert clock.sleeps == []

    def missing() -> None:
        raise JobNotFound(3)

    with pytest.raises(JobNotFound):
        retry_store_errors(missing, what="get_job", give_up_after=15.0, clock=clock,
                           sleep=clock.sleep)  # fmt: skip
    assert clock.sleeps == []


def _new_job() -> NewJob:
    return NewJob(
        provider="outbox", provider_settings={}, account="outbox", sender="o@example.edu",
        subject="Hi", templates={"text": "x"}, source="t", rate=0.0, burst=1, concurrency=1,
        max_retries=3, backoff=5.0, dedupe_key=None,
    )  # fmt: skip


def test_the_retrying_store_passes_a_real_store_through(tmp_path: Path) -> None:
    store = open_store(tmp_path / "jobs.db")
    wrapped = retrying(store, give_up_after=15.0)
    assert retrying(wrapped, give_up_after=1.0) is wrapped
    assert isinstance(wrapped, RetryingStore)
    assert wrapped.location == store.location and wrapped.server is False
    job_id = wrapped.create_job(_new_job(), [], now=1.0, domain="example.edu")
    assert wrapped.get_job(job_id).id == job_id
    assert wrapped.counts(job_id).total == 0
    assert list(wrapped.deliveries(job_id)) == []
    with pytest.raises(JobNotFound):
        wrapped.get_job(job_id + 1)
    wrapped.close()


def test_an_outcome_whose_commit_was_lost_is_retried_without_harm(tmp_path: Path) -> None:
    """The connection dropped during COMMIT of an outcome that did commit: the retry of the
    same guarded update changes nothing, and the outcome stands."""
    from bulkmail.store import Claimed, NewDelivery

    store = open_store(tmp_path / "jobs.db")
    job_id = store.create_job(
        _new_job(), [NewDelivery(2, "a@example.edu", "A", {})], now=1.0, domain="example.edu"
    )
    store.register_worker(job_id, worker_id="w", host="h", pid=1, now=1.0,
                          alive=lambda w: False)  # fmt: skip
    claim = store.claim(job_id, "w", now=2.0)
    assert isinstance(claim, Claimed)
    outcome = Outcome.sent(claim.delivery.id, "Q1", 3.0)
    clock = FakeClock()
    tries: list[bool] = []

    def record_then_lose_the_answer() -> bool:
        tries.append(store.record(outcome, "w"))
        if len(tries) == 1:
            raise StoreError("connection lost during COMMIT")
        return tries[-1]

    retry_store_errors(record_then_lose_the_answer, what="record", give_up_after=15.0,
                       clock=clock, sleep=clock.sleep)  # fmt: skip
    assert tries == [True, False]  # applied once; the retry found it done
    counts = store.counts(job_id)
    assert (counts.sent, counts.sending, counts.pending) == (1, 0, 0)
    assert store.get_job(job_id).state == "running"
    store.close()


def no_provider(job: JobRecord) -> Provider:
    raise AssertionError("not used")


def test_the_manager_retries_its_store_for_the_stale_window(tmp_path: Path) -> None:
    store = open_store(tmp_path / "jobs.db")
    manager = EmailManager(store, 1, provider_factory=no_provider, stale_after=12.0)
    assert isinstance(manager.store, RetryingStore)
    assert manager.store.give_up_after == 12.0
    store.close()
