"""The store's read side, written once in plain SQL that SQLite and PostgreSQL both accept.

``StoreReads`` implements every read that ``status``, ``recent`` and ``report`` need on top
of one primitive, ``_reading()``: a read transaction that runs SQL with ``:name`` parameters.
The SQLAlchemy store (:mod:`bulkmail.store.sql`) and the light SQLite reader
(:mod:`bulkmail.store.lite`) both provide it, so the queries exist only here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from bulkmail.errors import JobNotFound
from bulkmail.store.records import (
    Counts,
    DeliveryRecord,
    JobRecord,
    JobView,
    WorkerRecord,
    delivery_from_row,
    job_from_row,
    pick_dedupe,
    worker_from_row,
)

Rows = list[dict[str, Any]]
Query = Callable[[str, dict[str, Any]], Rows]

SQL_JOB = "SELECT * FROM jobs WHERE id = :job"
SQL_RECENT = "SELECT id FROM jobs ORDER BY id DESC LIMIT :limit"
# both read only the (job_id, state, ...) index and the partial in-doubt index
SQL_COUNTS = "SELECT state, count(*) AS n FROM deliveries WHERE job_id = :job GROUP BY state"
SQL_IN_DOUBT = "SELECT count(*) AS n FROM deliveries WHERE job_id = :job AND in_doubt"
SQL_WORKERS = "SELECT * FROM workers WHERE job_id = :job ORDER BY started_at"
# what a new job under a dedupe key skips: addresses sent by any job under the key, or
# still held (pending, sending) by one that is not cancelled
SQL_TAKEN_UNDER = (
    "SELECT d.email_key AS email_key, d.job_id AS job, d.state AS state FROM deliveries d "
    "JOIN jobs j ON j.id = d.job_id WHERE j.dedupe_key = :key AND (d.state = 'sent' OR "
    "(d.state IN ('pending', 'sending') AND j.state <> 'cancelled'))"
)
SQL_DELIVERIES = (
    "SELECT * FROM deliveries WHERE job_id = :job AND position > :after{states} "
    "ORDER BY position LIMIT :batch"
)


class StoreReads:
    """Reads of jobs, counts, workers and deliveries (see the module docstring)."""

    def _reading(self) -> AbstractContextManager[Query]:
        raise NotImplementedError

    def get_job(self, job_id: int) -> JobRecord:
        with self._reading() as query:
            return _job(query, job_id)

    def counts(self, job_id: int) -> Counts:
        with self._reading() as query:
            return _counts(query, job_id)

    def view(self, job_id: int) -> JobView:
        """The job, its counts and its workers, read in one transaction."""
        with self._reading() as query:
            job = _job(query, job_id)
            return JobView(job, _counts(query, job_id), _workers(query, job_id))

    def recent(self, limit: int) -> list[JobView]:
        """The newest ``limit`` jobs, newest first (with their workers, as ``view``)."""
        with self._reading() as query:
            ids = [row["id"] for row in query(SQL_RECENT, {"limit": limit})]
            return [
                JobView(
                    _job(query, job_id),
                    _counts(query, job_id),
                    _workers(query, job_id),
                )
                for job_id in ids
            ]

    def taken_under(self, dedupe_key: str) -> dict[str, tuple[int, str]]:
        """Addresses (lower-cased) a new job under ``dedupe_key`` will skip, with the job
        and state that hold each (see ``records.dedupe_reason``)."""
        with self._reading() as query:
            rows = query(SQL_TAKEN_UNDER, {"key": dedupe_key})
        return pick_dedupe((row["email_key"], row["job"], row["state"]) for row in rows)

    def deliveries(
        self, job_id: int, *, states: Sequence[str] | None = None, batch: int = 1000
    ) -> Iterator[DeliveryRecord]:
        """A job's deliveries in order, streamed in batches (reports, --failed)."""
        params: dict[str, Any] = {"job": job_id, "batch": batch}
        names = [f"s{n}" for n in range(len(states or ()))]
        params.update(zip(names, states or (), strict=True))
        where = f" AND state IN ({', '.join(':' + n for n in names)})" if names else ""
        sql = SQL_DELIVERIES.format(states=where)
        after = 0
        while True:
            with self._reading() as query:
                rows = query(sql, {**params, "after": after})
            if not rows:
                return
            yield from (delivery_from_row(row) for row in rows)
            after = rows[-1]["position"]


def _job(query: Query, job_id: int) -> JobRecord:
    rows = query(SQL_JOB, {"job": job_id})
    if not rows:
        raise JobNotFound(job_id)
    return job_from_row(rows[0])


def _counts(query: Query, job_id: int) -> Counts:
    values = {row["state"]: row["n"] for row in query(SQL_COUNTS, {"job": job_id})}
    values["in_doubt"] = query(SQL_IN_DOUBT, {"job": job_id})[0]["n"]
    return Counts(**values)


def _workers(query: Query, job_id: int) -> list[WorkerRecord]:
    rows = query(SQL_WORKERS, {"job": job_id})
    return [worker_from_row(row) for row in rows]
