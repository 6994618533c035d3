"""The store's read side, written once in plain SQL that SQLite and PostgreSQL both accept.

``StoreReads`` implements every read that ``status``, ``recent`` and ``report`` need on top
of one primitive, ``_reading()``: a read transaction that runs SQL with ``:name`` parameters.
The SQLAlchemy store (:mod:`bulkmail.store.sql`) and the light SQLite reader
(:mod:`bulkmail.store.readonly`) both provide it, so the queries exist only here.

The store's writes use the same definitions inside their own transactions: the job read
(with its ``FOR UPDATE`` variant), the worker read (all, or only those not stopped) and the
dedupe predicate (``DEDUPE_TAKEN``, with its claim-time variant ``DEDUPE_TAKEN_AT_CLAIM``).
Nothing here imports SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from bulkmail.errors import JobNotFound
from bulkmail.store.records import (
    Counts,
    DeliveryRecord,
    DeliveryState,
    EventKind,
    EventView,
    HistoryRecord,
    JobRecord,
    JobState,
    JobView,
    Suppression,
    WorkerRecord,
    delivery_from_row,
    job_from_row,
    pick_dedupe,
    worker_from_row,
)

Rows = list[dict[str, Any]]
Query = Callable[[str, dict[str, Any]], Rows]

_SENT, _PENDING, _SENDING = DeliveryState.SENT, DeliveryState.PENDING, DeliveryState.SENDING

SQL_JOB = "SELECT * FROM jobs WHERE id = :job"
# the job row held until the transaction ends (PostgreSQL only: SQLite has no FOR UPDATE,
# and its BEGIN IMMEDIATE already excludes every other writer)
SQL_JOB_FOR_UPDATE = SQL_JOB + " FOR UPDATE"
SQL_RECENT = "SELECT id FROM jobs ORDER BY id DESC LIMIT :limit"
# both read only the (job_id, state, ...) index and the partial in-doubt index
SQL_COUNTS = "SELECT state, count(*) AS n FROM deliveries WHERE job_id = :job GROUP BY state"
# (and how many of those are in flight again: a handful of rows among millions)
SQL_IN_DOUBT = (
    f"SELECT count(*) AS n, coalesce(sum(CASE WHEN state = '{_SENDING}' THEN 1 ELSE 0 END), 0)"
    " AS sending FROM deliveries WHERE job_id = :job AND in_doubt"
)
_SQL_WORKERS = "SELECT * FROM workers WHERE job_id = :job{live} ORDER BY started_at"
SQL_WORKERS = _SQL_WORKERS.format(live="")
SQL_LIVE_WORKERS = _SQL_WORKERS.format(live=" AND stopped_at IS NULL")  # not stopped

# The dedupe predicate, on deliveries ``d`` joined to their jobs ``j`` under one key: an
# address is taken when a job under the key has sent it, or still holds it (pending,
# sending) and is not cancelled. A new job under the key skips what is taken.
DEDUPE_TAKEN = (
    f"(d.state = '{_SENT}' OR (d.state IN ('{_PENDING}', '{_SENDING}') "
    f"AND j.state <> '{JobState.CANCELLED}'))"
)
# Its claim-time variant: a delivery about to be sent is skipped only when another job under
# the key has sent the address or is sending it right now (one still pending elsewhere will
# meet this same check when it is claimed).
DEDUPE_TAKEN_AT_CLAIM = f"d.state IN ('{_SENT}', '{_SENDING}')"
_SQL_TAKEN = (
    "SELECT d.email_key AS email_key, d.job_id AS job, d.state AS state FROM deliveries d "
    "JOIN jobs j ON j.id = d.job_id WHERE j.dedupe_key = :key AND {taken}"
)
# what a new job under a dedupe key skips (``taken_under``, and ``create_job`` batch by
# batch with ``AND d.email_key IN :keys``)
SQL_TAKEN_UNDER = _SQL_TAKEN.format(taken=DEDUPE_TAKEN)
SQL_TAKEN_AMONG = SQL_TAKEN_UNDER + " AND d.email_key IN :keys"
# whether another job under the key has sent (first) or is sending one address
SQL_TAKEN_AT_CLAIM = (
    _SQL_TAKEN.format(taken=DEDUPE_TAKEN_AT_CLAIM)
    + " AND d.email_key = :email AND d.job_id <> :job ORDER BY d.state DESC LIMIT 1"
)  # 'sent' sorts after 'sending': DESC puts a sent one first
# what happened after the send, per job: each delivery counted once per kind of event
_HARD = ", ".join(f"'{k}'" for k in (EventKind.BOUNCE, EventKind.REJECT))


def _distinct(condition: str, name: str) -> str:
    return f"count(DISTINCT CASE WHEN {condition} THEN delivery_id END) AS {name}"


SQL_EVENT_COUNTS = (
    "SELECT "
    + ", ".join(
        (
            _distinct(f"kind = '{EventKind.DELIVERY}'", "delivered"),
            _distinct(f"kind IN ({_HARD})", "bounced"),
            _distinct(f"kind = '{EventKind.SOFT_BOUNCE}'", "soft_bounced"),
            _distinct(f"kind = '{EventKind.SPAM}'", "complained"),
            _distinct(f"kind = '{EventKind.UNSUBSCRIBE}'", "unsubscribed"),
        )
    )
    + " FROM events WHERE job_id = :job AND delivery_id IS NOT NULL"
)
# a job's events with their delivery, oldest first ({where}: more conditions)
SQL_JOB_EVENTS = (
    "SELECT d.position AS position, d.email AS email, d.name AS name, e.kind AS kind, "
    "e.at AS at, e.detail AS detail FROM events e JOIN deliveries d ON d.id = e.delivery_id "
    "WHERE e.job_id = :job{where} ORDER BY e.at, e.id"
)
SQL_SUPPRESSIONS = "SELECT * FROM suppressions ORDER BY at, email_key"
SQL_SUPPRESSION = "SELECT * FROM suppressions WHERE email_key = :key"
SQL_ACCOUNT_SENDS = "SELECT at FROM sends WHERE account = :account AND at > :since ORDER BY at"

# every delivery to one address across jobs (the (email_key, state) index), oldest job first
SQL_HISTORY = (
    "SELECT d.job_id AS job_id, j.name AS job_name, j.subject AS subject, "
    "j.dedupe_key AS dedupe_key, d.email AS email, d.state AS state, d.attempts AS attempts, "
    "d.last_error AS last_error, d.sent_at AS sent_at, j.created_at AS created_at "
    "FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.email_key = :email "
    "ORDER BY d.job_id, d.position"
)
SQL_DELIVERIES = (
    "SELECT * FROM deliveries WHERE job_id = :job AND position > :after{states} "
    "ORDER BY position LIMIT :batch"
)

# the API tokens (only their hashes are stored): all of them, and the one a hash is of
SQL_TOKENS = "SELECT name, token_hash, role, created_at FROM api_tokens ORDER BY name"
SQL_TOKEN_BY_HASH = (
    "SELECT name, token_hash, role, created_at FROM api_tokens WHERE token_hash = :hash"
)


class StoreReads:
    """Reads of jobs, counts, workers and deliveries (see the module docstring): the
    ``contract.StoreReader`` of every store and reader."""

    location: str  # for messages: never shows a password

    def _reading(self) -> AbstractContextManager[Query]:
        raise NotImplementedError

    def get_job(self, job_id: int) -> JobRecord:
        with self._reading() as query:
            return read_job(query, job_id)

    def counts(self, job_id: int) -> Counts:
        with self._reading() as query:
            return read_counts(query, job_id)

    def view(self, job_id: int) -> JobView:
        """The job, its counts and its workers, read in one transaction."""
        with self._reading() as query:
            job = read_job(query, job_id)
            return JobView(job, read_counts(query, job_id), read_workers(query, job_id))

    def recent(self, limit: int) -> list[JobView]:
        """The newest ``limit`` jobs, newest first (with their workers, as ``view``)."""
        with self._reading() as query:
            ids = [row["id"] for row in query(SQL_RECENT, {"limit": limit})]
            return [
                JobView(
                    read_job(query, job_id),
                    read_counts(query, job_id),
                    read_workers(query, job_id),
                )
                for job_id in ids
            ]

    def taken_under(self, dedupe_key: str) -> dict[str, tuple[int, str]]:
        """Addresses (lower-cased) a new job under ``dedupe_key`` will skip, with the job
        and state that hold each (see ``records.dedupe_reason``)."""
        with self._reading() as query:
            rows = query(SQL_TAKEN_UNDER, {"key": dedupe_key})
        return pick_dedupe((row["email_key"], row["job"], row["state"]) for row in rows)

    def job_events(
        self,
        job_id: int,
        *,
        kinds: Sequence[str] | None = None,
        positions: tuple[int, int] | None = None,
    ) -> list[EventView]:
        """The job's events, oldest first: only those of ``kinds`` when given, and of the
        deliveries at positions ``after < p <= upto`` for ``positions=(after, upto)``."""
        params: dict[str, Any] = {"job": job_id}
        where = ""
        if kinds:
            names = [f"k{n}" for n in range(len(kinds))]
            params.update(zip(names, kinds, strict=True))
            where += f" AND e.kind IN ({', '.join(':' + n for n in names)})"
        if positions is not None:
            params.update(after=positions[0], upto=positions[1])
            where += " AND d.position > :after AND d.position <= :upto"
        with self._reading() as query:
            rows = query(SQL_JOB_EVENTS.format(where=where), params)
        return [EventView(**row) for row in rows]

    def suppressions(self) -> list[Suppression]:
        """The suppression list, oldest first."""
        with self._reading() as query:
            return [suppression_from_row(row) for row in query(SQL_SUPPRESSIONS, {})]

    def account_sends(self, account: str, *, since: float) -> list[float]:
        """When the account's sends the caps count went out after ``since``, oldest first."""
        with self._reading() as query:
            rows = query(SQL_ACCOUNT_SENDS, {"account": account, "since": since})
            return [float(row["at"]) for row in rows]

    def suppression(self, email: str) -> Suppression | None:
        """Whether (and why) ``email`` is on the suppression list."""
        with self._reading() as query:
            rows = query(SQL_SUPPRESSION, {"key": email.strip().lower()})
        return suppression_from_row(rows[0]) if rows else None

    def history(self, email: str) -> list[HistoryRecord]:
        """Every delivery to ``email`` (matched case-insensitively) in every job, oldest job
        first."""
        with self._reading() as query:
            rows = query(SQL_HISTORY, {"email": email.strip().lower()})
        return [HistoryRecord(**row) for row in rows]

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


def read_job(query: Query, job_id: int, *, for_update: bool = False) -> JobRecord:
    """The job (``JobNotFound`` if there is none); ``for_update``: lock its row (see
    ``SQL_JOB_FOR_UPDATE``)."""
    rows = query(SQL_JOB_FOR_UPDATE if for_update else SQL_JOB, {"job": job_id})
    if not rows:
        raise JobNotFound(job_id)
    return job_from_row(rows[0])


def read_counts(query: Query, job_id: int) -> Counts:
    values = {row["state"]: row["n"] for row in query(SQL_COUNTS, {"job": job_id})}
    doubt = query(SQL_IN_DOUBT, {"job": job_id})[0]
    values["in_doubt"], values["sending_in_doubt"] = doubt["n"], int(doubt["sending"])
    values.update(query(SQL_EVENT_COUNTS, {"job": job_id})[0])
    return Counts(**values)


def suppression_from_row(row: dict[str, Any]) -> Suppression:
    return Suppression(
        email=row["email"],
        reason=row["reason"],
        at=row["at"],
        job_id=row["job_id"],
        detail=row["detail"],
    )


def read_workers(query: Query, job_id: int, *, live_only: bool = False) -> list[WorkerRecord]:
    """The job's workers, oldest first; ``live_only``: those not stopped."""
    rows = query(SQL_LIVE_WORKERS if live_only else SQL_WORKERS, {"job": job_id})
    return [worker_from_row(row) for row in rows]
