"""``claim_batch`` and ``record_many``: several deliveries claimed in one transaction for a
provider's batch request, and their outcomes committed together. Each test takes ``store``
(conftest.py): a real SQLite file, then a real PostgreSQL database."""

from __future__ import annotations

from bulkmail.store import (
    ClaimedBatch,
    DeliveryState,
    Outcome,
    Stop,
    Store,
    Wait,
)
from tests.test_store import new_job, people, start


def _states(store: Store, job_id: int) -> dict[int, str]:
    return {d.position: d.state for d in store.deliveries(job_id)}


def test_claim_batch_marks_every_claimed_delivery_sending_in_order(store: Store) -> None:
    job = store.create_job(new_job(), people(5), now=100.0, domain="example.edu")
    start(store, job)
    claim = store.claim_batch(job, "w1", now=101.0, limit=3)
    assert isinstance(claim, ClaimedBatch)
    assert [d.email for d in claim.deliveries] == [
        "p0@example.edu",
        "p1@example.edu",
        "p2@example.edu",
    ]
    assert all(d.state == DeliveryState.SENDING and d.attempts == 1 for d in claim.deliveries)
    assert all(d.worker_id == "w1" for d in claim.deliveries)
    # committed before any request: another read sees them sending
    stored = {d.id: d for d in store.deliveries(job)}
    for d in claim.deliveries:
        assert (stored[d.id].state, stored[d.id].attempts, stored[d.id].worker_id) == (
            DeliveryState.SENDING,
            1,
            "w1",
        )
    assert store.counts(job).pending == 2

    rest = store.claim_batch(job, "w1", now=101.0, limit=10)
    assert isinstance(rest, ClaimedBatch)
    assert [d.email for d in rest.deliveries] == ["p3@example.edu", "p4@example.edu"]
    # nothing pending, but five in flight: not finished yet
    assert store.claim_batch(job, "w1", now=101.0, limit=10) == Stop("running", finished=True)


def test_claim_batch_settles_the_previous_outcomes_first(store: Store) -> None:
    job = store.create_job(new_job(), people(4), now=100.0, domain="example.edu")
    start(store, job)
    first = store.claim_batch(job, "w1", now=101.0, limit=2)
    assert isinstance(first, ClaimedBatch)
    a, b = first.deliveries
    settle = [Outcome.sent(a.id, "mt-1", 102.0), Outcome.failed(b.id, "bad address")]
    second = store.claim_batch(job, "w1", now=102.0, limit=2, settle=settle)
    assert isinstance(second, ClaimedBatch)
    assert len(second.deliveries) == 2
    rows = {d.id: d for d in store.deliveries(job)}
    assert (rows[a.id].state, rows[a.id].provider_message_id) == (DeliveryState.SENT, "mt-1")
    assert (rows[b.id].state, rows[b.id].last_error) == (DeliveryState.FAILED, "bad address")
    assert store.counts(job).sent == 1


def test_claim_batch_waits_for_what_is_not_due_and_stops_a_stopped_job(store: Store) -> None:
    job = store.create_job(new_job(), people(2), now=100.0, domain="example.edu")
    start(store, job)
    claim = store.claim_batch(job, "w1", now=101.0, limit=5)
    assert isinstance(claim, ClaimedBatch)
    retry = [Outcome.retry(d.id, "429", 131.0) for d in claim.deliveries]
    assert store.record_many(retry, "w1") == 2
    wait = store.claim_batch(job, "w1", now=121.0, limit=5)
    assert isinstance(wait, Wait) and abs(wait.seconds - 10.0) < 1e-6
    store.cancel(job, now=122.0)
    assert isinstance(store.claim_batch(job, "w1", now=140.0, limit=5), Stop)


def test_record_many_commits_only_what_is_still_this_workers(store: Store) -> None:
    job = store.create_job(new_job(), people(3), now=100.0, domain="example.edu")
    start(store, job)
    claim = store.claim_batch(job, "w1", now=101.0, limit=3)
    assert isinstance(claim, ClaimedBatch)
    a, b, c = claim.deliveries
    assert store.release(c.id, "w1")  # given back untried: no longer in flight
    outcomes = [
        Outcome.sent(a.id, "mt-a", 102.0),
        Outcome.retry(b.id, "timeout", 110.0, in_doubt=True),
        Outcome.sent(c.id, "mt-c", 102.0),
    ]
    assert store.record_many(outcomes, "w1") == 2
    assert store.record_many([], "w1") == 0
    rows = {d.id: d for d in store.deliveries(job)}
    assert rows[a.id].state == DeliveryState.SENT
    assert (rows[b.id].state, rows[b.id].in_doubt) == (DeliveryState.PENDING, True)
    assert (rows[c.id].state, rows[c.id].attempts) == (DeliveryState.PENDING, 0)
    assert store.view(job).workers[0].sent == 1


def test_claim_batch_skips_addresses_taken_under_the_dedupe_key(store: Store) -> None:
    older = store.create_job(new_job(dedupe_key="term"), people(2), now=100.0, domain="x.edu")
    start(store, older, worker="wa")
    first = store.claim_batch(older, "wa", now=101.0, limit=2)
    assert isinstance(first, ClaimedBatch)
    store.record_many([Outcome.failed(d.id, "550") for d in first.deliveries], "wa")
    # failed addresses are not taken: the newer job holds all four
    newer = store.create_job(new_job(dedupe_key="term"), people(4), now=102.0, domain="x.edu")
    assert store.counts(newer).pending == 4
    # the older job is retried and sends its two first (e.g. `bulkmail retry`)
    assert store.retry_failed(older) == 2
    again = store.claim_batch(older, "wa", now=103.0, limit=2)
    assert isinstance(again, ClaimedBatch)
    store.record_many([Outcome.sent(d.id, None, 103.0) for d in again.deliveries], "wa")

    start(store, newer, worker="wb")
    claim = store.claim_batch(newer, "wb", now=104.0, limit=4)
    assert isinstance(claim, ClaimedBatch)
    assert [d.email for d in claim.deliveries] == ["p2@example.edu", "p3@example.edu"]
    states = _states(store, newer)
    assert [states[p] for p in sorted(states)] == [DeliveryState.SKIPPED] * 2 + [
        DeliveryState.SENDING
    ] * 2
