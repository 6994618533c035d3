"""``--recheck``: before each send, is the recipient still due?

A job made from the course database with ``--recheck`` records its query and the database
URL without its password. Before each claim the worker asks ``Recheck.check``: at most once
per ``interval`` (a minute) it runs the query again, read-only, and turns the job's pending
deliveries to addresses the query no longer returns into ``skipped`` ("no longer returned by
the query"). A query that fails (the database is down) skips nobody: the worker says so and
goes on with what it knew. The URL with its password comes, at run time, from the command
that created the job (in memory, or the environment of the worker it detached), else from
BULKMAIL_DB or ``db`` under ``[defaults]`` in the config file: a URL naming the same
database, user, host and port.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from bulkmail.errors import BulkmailError
from bulkmail.sources import QUERY_TIMEOUT, query_addresses
from bulkmail.store import JobRecord, JobStore
from bulkmail.store.records import DeliveryState

__all__ = [
    "RECHECK_INTERVAL",
    "RECHECK_REASON",
    "Recheck",
    "RecheckUnavailable",
    "for_job",
    "runtime_url",
]

log = logging.getLogger("bulkmail")

RECHECK_INTERVAL = 60.0  # seconds an answer of the query is used before it is asked again
RECHECK_REASON = "no longer returned by the query"

_Query = Callable[[str, str, float], frozenset[str]]


class RecheckUnavailable(BulkmailError):
    """The job's database URL needs a password that this worker cannot find."""


def _parse(url: str) -> URL | None:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def _same_database(a: URL, b: URL) -> bool:
    return (
        a.get_backend_name() == b.get_backend_name()
        and (a.host or "") == (b.host or "")
        and a.port == b.port
        and (a.username or "") == (b.username or "")
        and (a.database or "") == (b.database or "")
    )


def runtime_url(stored: str, candidates: Iterable[str | None]) -> str | None:
    """The URL to run a job's recheck query on: the stored one when it had no password;
    else the first of ``candidates`` naming the same database (backend, host, port, user,
    database) with a password; None when there is none."""
    recorded = _parse(stored)
    if recorded is None:
        return None
    if recorded.password is None:
        return stored
    for candidate in candidates:
        parsed = _parse(candidate) if candidate else None
        if parsed is None or not _same_database(recorded, parsed):
            continue
        if parsed.password or parsed.query.get("password"):
            return candidate
    return None


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S UTC")


class Recheck:
    """The job's query, asked again at most once per ``interval`` of ``clock`` (POSIX
    seconds); thread-safe: the sending threads of a worker share one. ``run(url, query,
    timeout)`` gives the addresses (lower-cased) the query returns (injected in tests)."""

    def __init__(
        self,
        job_id: int,
        url: str,
        query: str,
        *,
        clock: Callable[[], float],
        interval: float = RECHECK_INTERVAL,
        timeout: float = QUERY_TIMEOUT,
        run: _Query | None = None,
    ) -> None:
        self.job_id = job_id
        self.url = url
        self.query = query
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self._run: _Query = run or (lambda u, q, t: query_addresses(u, q, timeout=t))
        self._lock = threading.Lock()
        self._asked_at: float | None = None  # the last run of the query, failed or not
        self._answered_at: float | None = None  # the last run that answered
        self.returned: frozenset[str] | None = None  # the last answer
        self.runs = 0  # how many times the query ran (tests count them)

    def due(self, now: float) -> bool:
        """Whether the last answer is too old (or there is none; a clock that went back
        counts as due)."""
        if self._asked_at is None:
            return True
        age = now - self._asked_at
        return age < 0 or age >= self.interval

    def check(self, store: JobStore) -> int:
        """Before a send: when due, run the query and skip the job's pending deliveries to
        addresses it no longer returns; returns how many were skipped now. A failing query
        skips nobody (a warning, then the next try an interval later)."""
        with self._lock:  # the other sending threads wait: nobody sends past a due check
            now = self.clock()
            if not self.due(now):
                return 0
            self._asked_at = now
            self.runs += 1
            try:
                returned = self._run(self.url, self.query, self.timeout)
            except Exception as exc:  # the database down, a changed table: never the worker
                known = (
                    f"the answer of {_stamp(self._answered_at)}"
                    if self._answered_at is not None
                    else "every pending recipient"
                )
                log.warning(
                    "job %s: --recheck: %s; nobody skipped, going on with %s",
                    self.job_id,
                    exc,
                    known,
                )
                return 0
            self.returned, self._answered_at = returned, now
            gone = {
                d.email.lower()
                for d in store.deliveries(self.job_id, states=[DeliveryState.PENDING])
                if d.email.lower() not in returned
            }
            if not gone:
                return 0
            count = store.skip_pending(self.job_id, gone, RECHECK_REASON)
            if count:
                log.warning(
                    "job %s: --recheck: %d recipients %s: skipped",
                    self.job_id,
                    count,
                    RECHECK_REASON,
                )
            return count


def for_job(
    job: JobRecord,
    *,
    urls: Iterable[str | None],
    clock: Callable[[], float],
    interval: float = RECHECK_INTERVAL,
) -> Recheck | None:
    """The job's ``Recheck`` (None without ``--recheck``); RecheckUnavailable, one line
    saying what to set, when its database needs a password none of ``urls`` gives."""
    if not job.recheck_query or not job.recheck_url:
        return None
    url = runtime_url(job.recheck_url, urls)
    if url is None:
        raise RecheckUnavailable(
            f"--recheck: {job.recheck_url} needs its password, which this worker does not "
            "have: set BULKMAIL_DB (or db under [defaults] in the config file) to that URL "
            f"with the password, then: bulkmail resume {job.id}"
        )
    return Recheck(job.id, url, job.recheck_query, clock=clock, interval=interval)
