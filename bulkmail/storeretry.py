"""A worker's job store that rides out a store outage: a store error is retried with backoff.

A PostgreSQL restart (``pg_ctl restart -m fast``: half a second), a failover or a network
cut ends every connection at once; a SQLite store can stay locked past its busy timeout. A
worker must not give up on its job for that: ``RetryingStore`` retries each call that failed
with a ``StoreError`` (a lost connection, a refused one, a lock timeout), waiting 0.1 s and
doubling up to 2 s, until ``give_up_after`` seconds (the stale window: past it, other workers
take this one for gone anyway) have passed since the first failure; then the last error is
raised, as before.

Retrying is safe because every call the send loop makes is idempotent or harmless when its
first attempt did commit but its answer was lost (the connection dropped during COMMIT):

- reads (``get_job``, ``counts``, ``next_due``, ``view``...) change nothing;
- an outcome (``record``, a ``claim``'s ``settle``) and ``release`` only change a delivery
  still ``sending`` under this worker: the second attempt finds it done and changes nothing,
  so an outcome is never lost and never applied twice;
- ``heartbeat``, ``reclaim`` and ``finish_worker`` compute from what is stored;
- ``reserve_slot`` taken twice only wastes a slot (the send comes a little later);
- a ``claim`` committed whose answer was lost leaves that delivery ``sending`` under this
  worker, never handed to the provider: it is not sent twice; when the worker stops it is
  taken over like any delivery left in flight.

The clock and the sleep are injected (tests run it with a fake clock, no real waiting).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from bulkmail.errors import StoreError

if TYPE_CHECKING:
    from bulkmail.store.contract import JobStore

__all__ = ["FIRST_DELAY", "MAX_DELAY", "RetryingStore", "retry_store_errors", "retrying"]

log = logging.getLogger("bulkmail")

FIRST_DELAY = 0.1  # seconds before the first retry
MAX_DELAY = 2.0  # the longest wait between two tries

T = TypeVar("T")


def retry_store_errors(
    call: Callable[[], T],
    *,
    what: str,
    give_up_after: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
    first_delay: float = FIRST_DELAY,
    max_delay: float = MAX_DELAY,
) -> T:
    """``call()``, tried again after each ``StoreError`` with a doubling delay (``first_delay``
    up to ``max_delay``) until ``give_up_after`` seconds have passed since the first failure;
    then that last error is raised. Other exceptions pass through at once."""
    started: float | None = None
    delay = first_delay
    tries = 0
    while True:
        try:
            result = call()
        except StoreError as exc:
            now = clock()
            if started is None:
                started = now
                log.warning("job store error (%s): %s; trying again", what, exc)
            left = started + give_up_after - now
            if left <= 0:
                log.error("job store error (%s): gave up after %d tries: %s", what, tries + 1, exc)
                raise
            sleep(min(delay, left))
            delay = min(delay * 2.0, max_delay)
            tries += 1
            continue
        if tries:
            log.warning("job store reachable again (%s) after %d retries", what, tries)
        return result


# calls that are not retried: create_job streams its recipients once; deliveries is a
# generator (each of its batches is its own read)
_NOT_RETRIED = frozenset({"create_job", "deliveries", "close"})


class RetryingStore:
    """A ``JobStore`` whose calls (every method but ``create_job``, ``deliveries`` and
    ``close``) are retried on ``StoreError``; see the module docstring. Build it with
    ``retrying``. A proxy, so it follows the contract as the contract grows."""

    def __init__(
        self,
        store: JobStore,
        *,
        give_up_after: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.inner = store
        self.give_up_after = give_up_after
        self.clock = clock
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if name.startswith("_") or name in _NOT_RETRIED or not callable(value):
            return value

        @functools.wraps(value)
        def retried(*args: Any, **kwargs: Any) -> Any:
            return retry_store_errors(
                lambda: value(*args, **kwargs),
                what=name,
                give_up_after=self.give_up_after,
                clock=self.clock,
                sleep=self.sleep,
            )

        return retried


def retrying(
    store: JobStore,
    *,
    give_up_after: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> JobStore:
    """``store`` with its calls retried on ``StoreError`` for up to ``give_up_after``
    seconds (a store already wrapped is wrapped once)."""
    if isinstance(store, RetryingStore):
        return cast("JobStore", store)
    wrapped = RetryingStore(store, give_up_after=give_up_after, clock=clock, sleep=sleep)
    return cast("JobStore", wrapped)
