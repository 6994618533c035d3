"""The job store on SQLAlchemy 2 Core: every write, the send loop's claims and outcomes,
the worker leases and the shared rate-limit rows (the contract: :mod:`bulkmail.store.contract`).

The store is addressed by a URL (see :mod:`bulkmail.store.engine`); a plain path or
``sqlite:///...`` is the embedded default, where every read-modify-write step runs in one
short ``BEGIN IMMEDIATE`` transaction so several processes can share one file.

A ``postgresql://`` URL (driver: psycopg 3, ``pip install 'bulkmail[postgres]'``) puts the
same schema (:mod:`bulkmail.store.schema`) on PostgreSQL, where any number of workers on any
number of hosts share a job: they claim deliveries with ``SELECT ... FOR UPDATE SKIP
LOCKED``, take the job row with ``SELECT ... FOR UPDATE`` whenever they change who runs it
(register, reclaim, finish, cancel), and share one rate-limit row, also locked with ``FOR
UPDATE``. Locks are always taken in the order jobs -> deliveries -> workers, so two
transactions never wait on each other in a circle. On SQLite there is no ``FOR UPDATE``:
``BEGIN IMMEDIATE`` already serialises every writer.

The reads, and the SQL of the store's shared knowledge (the job and worker reads, the dedupe
predicate), are those of :mod:`bulkmail.store.reads`, run here on the transaction's
connection.

Times are stored as POSIX seconds (floats) and passed in by the caller (``now``), so the
logic that depends on them can be tested with a fixed clock.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from bulkmail.errors import JobStateError, StoreError
from bulkmail.store.engine import open_engine
from bulkmail.store.reads import (
    SQL_TAKEN_AMONG,
    SQL_TAKEN_AT_CLAIM,
    Query,
    StoreReads,
    read_job,
    read_workers,
)
from bulkmail.store.records import (
    WORKER_STOPPED,
    Claimed,
    ClaimResult,
    DeliveryState,
    JobRecord,
    JobState,
    NewDelivery,
    NewJob,
    Outcome,
    Reclaimed,
    Registration,
    Stop,
    Wait,
    WorkerAlive,
    WorkerRecord,
    dedupe_reason,
    delivery_from_row,
    message_id,
    pick_dedupe,
)
from bulkmail.store.schema import create_schema, deliveries, jobs, rate_buckets, workers

if TYPE_CHECKING:
    from bulkmail.store.contract import JobStore

__all__ = ["Store", "open_store"]

_PENDING, _SENDING = DeliveryState.PENDING, DeliveryState.SENDING
_HELD = (DeliveryState.PENDING, DeliveryState.SENDING)  # not done yet: pending or in flight


@functools.cache
def _sql(text: str) -> sa.TextClause:
    """A plain SQL statement of :mod:`bulkmail.store.reads`, parsed once."""
    clause = sa.text(text)
    if ":keys" in text:
        clause = clause.bindparams(sa.bindparam("keys", expanding=True))
    return clause


def _query(conn: Connection) -> Query:
    """The reads' primitive (``reads.Query``) on this connection's transaction."""

    def query(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [dict(row) for row in conn.execute(_sql(sql), params).mappings()]

    return query


# The send loop's statements, built once (building a Core statement costs more than running
# it on SQLite) and executed with bound parameters.


@functools.cache
def _stmt_claim_context() -> sa.Select[Any]:
    """The job's state and dedupe key, and whether the claiming worker was stopped."""
    worker = sa.select(workers.c.stopped_at).where(workers.c.id == sa.bindparam("b_worker"))
    return sa.select(jobs.c.state, jobs.c.dedupe_key, worker.scalar_subquery()).where(
        jobs.c.id == sa.bindparam("b_job")
    )


@functools.cache
def _stmt_next_due_row() -> sa.Select[Any]:
    return (
        sa.select(deliveries)
        .where(
            deliveries.c.job_id == sa.bindparam("b_job"),
            deliveries.c.state == _PENDING,
            deliveries.c.next_attempt_at <= sa.bindparam("b_now"),
        )
        .order_by(deliveries.c.next_attempt_at, deliveries.c.position)
        .limit(1)
        # other workers' claims in progress are skipped, not waited for (PostgreSQL)
        .with_for_update(skip_locked=True)
    )


@functools.cache
def _stmt_mark_sending() -> sa.Update:
    return (
        deliveries.update()
        .where(deliveries.c.id == sa.bindparam("b_id"), deliveries.c.state == _PENDING)
        .values(
            state=_SENDING,
            attempts=sa.bindparam("b_attempts"),
            worker_id=sa.bindparam("b_worker"),
        )
    )


@functools.cache
def _stmt_min_due() -> sa.Select[Any]:
    return sa.select(sa.func.min(deliveries.c.next_attempt_at)).where(
        deliveries.c.job_id == sa.bindparam("b_job"), deliveries.c.state == _PENDING
    )


@functools.cache
def _stmt_outcome(keys: tuple[str, ...]) -> sa.Update:
    return (
        deliveries.update()
        .where(
            deliveries.c.id == sa.bindparam("o_id"),
            deliveries.c.state == _SENDING,
            deliveries.c.worker_id == sa.bindparam("o_worker"),
        )
        .values({key: sa.bindparam(f"v_{key}") for key in keys})
    )


@functools.cache
def _stmt_worker_sent() -> sa.Update:
    return (
        workers.update()
        .where(workers.c.id == sa.bindparam("b_worker"))
        .values(sent=workers.c.sent + 1)
    )


def open_store(location: str | os.PathLike[str] | None = None, *, create: bool = True) -> Store:
    """Open (upgrading when older) the job store at ``location``. When there is none yet
    it is created if ``create`` (``Store.created`` says so), else ``NoJobStore`` is raised
    and nothing is created: not the file, not its folder, not the tables."""
    opened = open_engine(location, create=create)
    store = Store(opened.engine, opened.location, url=opened.url)
    try:
        store.created = store.create_schema(create=create) or opened.created
    except BaseException:
        store.close()
        raise
    return store


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Store(StoreReads):
    """Every read and write of the job store. Thread-safe: each call takes its own
    connection from the pool and holds a transaction only for its own duration."""

    def __init__(self, engine: Engine, location: str, *, url: str | None = None) -> None:
        self.engine = engine
        self.location = location  # for messages: never shows a password
        self.url = url or location  # to hand to a worker process: may hold a password
        self.server = engine.dialect.name == "postgresql"  # several hosts may share it
        self.created = False  # open_store made this store just now

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One short read-modify-write transaction (BEGIN IMMEDIATE on SQLite)."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(bulkmail_write=True)
                with conn.begin():
                    yield conn
        except sa.exc.OperationalError as exc:
            raise StoreError(f"{self.location}: {_one_line(exc.orig)}") from exc

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except sa.exc.OperationalError as exc:
            raise StoreError(f"{self.location}: {_one_line(exc.orig)}") from exc

    @contextmanager
    def _reading(self) -> Iterator[Query]:
        with self._read() as conn:
            yield _query(conn)

    def create_schema(self, *, create: bool = True) -> bool:
        """Create the schema on first use (when ``create``; True then), or migrate an older
        one (``schema.create_schema``), in ONE write transaction."""
        try:
            with self._write() as conn:
                return create_schema(
                    conn, server=self.server, location=self.location, create=create
                )
        except sa.exc.DatabaseError as exc:
            raise StoreError(f"{self.location}: not a bulkmail job store ({exc.orig})") from None

    # -- jobs

    def create_job(
        self, new: NewJob, recipients: Iterable[NewDelivery], *, now: float, domain: str
    ) -> int:
        """Create a job and all its deliveries in ONE transaction, streaming ``recipients``
        in batches. Any exception raised while iterating (bad row, template error) rolls
        everything back: bad input never leaves a job behind.

        Addresses already ``sent`` under the same ``dedupe_key`` in any job become
        ``skipped`` deliveries with the reason.
        """
        token = secrets.token_hex(4)
        with self._write() as conn:
            inserted = conn.execute(
                jobs.insert()
                .values(
                    token=token,
                    state=JobState.QUEUED,
                    provider=new.provider,
                    provider_settings=_json(dict(new.provider_settings)),
                    account=new.account,
                    sender=new.sender,
                    subject=new.subject,
                    templates=_json(dict(new.templates)),
                    source=new.source,
                    rate=new.rate,
                    burst=new.burst,
                    concurrency=new.concurrency,
                    max_retries=new.max_retries,
                    backoff=new.backoff,
                    dedupe_key=new.dedupe_key,
                    total=0,
                    created_at=now,
                )
                .returning(jobs.c.id)
            )
            job_id = int(inserted.scalar_one())
            position = 0
            batch: list[dict[str, Any]] = []

            def flush() -> None:
                if not batch:
                    return
                if new.dedupe_key:
                    self._mark_already_sent(conn, new.dedupe_key, batch)
                conn.execute(deliveries.insert(), batch)
                batch.clear()

            for rcpt in recipients:
                position += 1
                batch.append(
                    {
                        "job_id": job_id,
                        "position": position,
                        "row": rcpt.row,
                        "email": rcpt.email,
                        "email_key": rcpt.email.lower(),
                        "name": rcpt.name,
                        "fields": _json(dict(rcpt.fields)),
                        "state": DeliveryState.SKIPPED if rcpt.skip_reason else _PENDING,
                        "attempts": 0,
                        "last_error": rcpt.skip_reason,
                        "next_attempt_at": 0.0,
                        "message_id": message_id(job_id, position, token, domain),
                        "in_doubt": False,
                    }
                )
                if len(batch) >= 1000:
                    flush()
            flush()
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(total=position))
        return job_id

    def _mark_already_sent(
        self, conn: Connection, dedupe_key: str, batch: list[dict[str, Any]]
    ) -> None:
        """Skip the batch's addresses that another job under ``dedupe_key`` has sent or
        still holds (a paused cron run's pending reminders are not sent twice)."""
        keys = {row["email_key"] for row in batch if row["state"] == _PENDING}
        if not keys:
            return
        rows = _query(conn)(SQL_TAKEN_AMONG, {"key": dedupe_key, "keys": sorted(keys)})
        taken = pick_dedupe((row["email_key"], row["job"], row["state"]) for row in rows)
        for row in batch:
            if row["state"] == _PENDING and row["email_key"] in taken:
                job, state = taken[row["email_key"]]
                row["state"] = DeliveryState.SKIPPED
                row["last_error"] = dedupe_reason(dedupe_key, job, state)

    def _job(self, conn: Connection, job_id: int, *, lock: bool = False) -> JobRecord:
        """The job; ``lock``: hold its row until the transaction ends (``FOR UPDATE`` on
        PostgreSQL; on SQLite the write transaction already excludes other writers)."""
        return read_job(_query(conn), job_id, for_update=lock and self.server)

    def set_log_path(self, job_id: int, path: str) -> None:
        with self._write() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(log_path=path))

    # -- workers

    def _workers(
        self, conn: Connection, job_id: int, *, live_only: bool = False
    ) -> list[WorkerRecord]:
        return read_workers(_query(conn), job_id, live_only=live_only)

    def register_worker(
        self,
        job_id: int,
        *,
        worker_id: str,
        host: str,
        pid: int,
        now: float,
        alive: WorkerAlive,
        exclusive: bool = True,
    ) -> Registration:
        """Register a worker on a job and make the job ``running``.

        Refuses a job that is completed or cancelled, and, when ``exclusive``, a job that a
        live worker still holds. Workers that are gone are marked stopped, and deliveries
        they left in ``sending`` are put back to ``pending`` marked in doubt: they will be
        sent again with the same Message-ID.
        """
        with self._write() as conn:
            job = self._job(conn, job_id, lock=True)
            if job.state in (JobState.COMPLETED, JobState.CANCELLED):
                raise JobStateError(f"job {job_id} is {job.state}; there is nothing to run")
            current = self._workers(conn, job_id, live_only=True)
            live = [w for w in current if alive(w)]
            if live and exclusive:
                w = live[0]
                raise JobStateError(
                    f"job {job_id} is being run by worker pid {w.pid} on {w.host}; "
                    f"watch it with `bulkmail status {job_id} --watch` or stop it with "
                    f"`bulkmail cancel {job_id}`"
                )
            reclaimed = self._take_over(conn, job_id, current, live, now=now)
            conn.execute(
                workers.insert().values(
                    id=worker_id,
                    job_id=job_id,
                    host=host,
                    pid=pid,
                    started_at=now,
                    heartbeat_at=now,
                    sent=0,
                )
            )
            values: dict[str, Any] = {"state": JobState.RUNNING, "finished_at": None, "error": None}
            if job.started_at is None:
                values["started_at"] = now
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        return Registration(worker_id, reclaimed)

    def _take_over(
        self,
        conn: Connection,
        job_id: int,
        current: Sequence[WorkerRecord],
        live: Sequence[WorkerRecord],
        *,
        now: float,
    ) -> int:
        """Put the job's deliveries in ``sending`` that no live worker holds back to
        ``pending``, in doubt, and mark the gone workers stopped; return how many. The
        caller holds the job row (lock order: jobs, deliveries, workers)."""
        live_ids = [w.id for w in live]
        reclaim = deliveries.update().where(
            deliveries.c.job_id == job_id, deliveries.c.state == _SENDING
        )
        if live_ids:
            reclaim = reclaim.where(deliveries.c.worker_id.not_in(live_ids))
        reclaimed = conn.execute(
            reclaim.values(state=_PENDING, in_doubt=True, next_attempt_at=0.0)
        ).rowcount
        dead = [w.id for w in current if w.id not in live_ids]
        if dead:
            conn.execute(workers.update().where(workers.c.id.in_(dead)).values(stopped_at=now))
        return int(reclaimed)

    def heartbeat(self, worker_id: str, *, now: float) -> str:
        """Renew a worker's heartbeat; return its job's state (so a cancel is noticed), or
        ``WORKER_STOPPED`` when other workers took this one for gone (its heartbeat had gone
        stale) and took over its deliveries: it must stop before its next message."""
        with self._write() as conn:
            conn.execute(workers.update().where(workers.c.id == worker_id).values(heartbeat_at=now))
            row = conn.execute(
                sa.select(jobs.c.state, workers.c.stopped_at)
                .join(workers, workers.c.job_id == jobs.c.id)
                .where(workers.c.id == worker_id)
            ).first()
        if row is None:
            return "None"  # no such worker
        return WORKER_STOPPED if row.stopped_at is not None else str(row.state)

    def reclaim(self, job_id: int, *, worker_id: str, now: float, alive: WorkerAlive) -> Reclaimed:
        """Take over the deliveries of the job's gone workers (what a live worker does at
        each heartbeat, and while it waits for the last messages of others).

        A worker is gone when ``alive`` says so: its pid no longer runs on this host, or its
        heartbeat is stale. Its deliveries in ``sending`` go back to ``pending`` in doubt
        (they are sent again with the same Message-ID) and it is marked stopped. A worker
        that heart-beats is never touched, however long its message takes; ``worker_id``
        (the caller) counts as alive. Only a ``running`` job is touched.
        """

        def is_alive(w: WorkerRecord) -> bool:
            return w.id == worker_id or alive(w)

        # a plain read first: the common case (everyone alive) takes no lock
        with self._read() as conn:
            state = conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar()
            if state != JobState.RUNNING:
                return Reclaimed(0, 0)
            current = self._workers(conn, job_id, live_only=True)
            if worker_id not in {w.id for w in current}:
                return Reclaimed(0, 0)  # the caller was itself taken for gone: not its call
            live = {w.id for w in current if is_alive(w)}
            held = self._sending_by_worker(conn, job_id)
        orphans = any(w not in live for w in held)
        if len(live) == len(current) and not orphans:
            return Reclaimed(0, sum(n for w, n in held.items() if w != worker_id))
        with self._write() as conn:
            job = self._job(conn, job_id, lock=True)
            if job.state != JobState.RUNNING:
                return Reclaimed(0, 0)
            current = self._workers(conn, job_id, live_only=True)
            live_workers = [w for w in current if is_alive(w)]
            reclaimed = self._take_over(conn, job_id, current, live_workers, now=now)
            held = self._sending_by_worker(conn, job_id)
        return Reclaimed(reclaimed, sum(n for w, n in held.items() if w != worker_id))

    def _sending_by_worker(self, conn: Connection, job_id: int) -> dict[str, int]:
        rows = conn.execute(
            sa.select(deliveries.c.worker_id, sa.func.count())
            .where(deliveries.c.job_id == job_id, deliveries.c.state == _SENDING)
            .group_by(deliveries.c.worker_id)
        )
        return {str(w): int(n) for w, n in rows}

    def finish_worker(
        self, worker_id: str, *, now: float, stop: str | None, error: str | None
    ) -> str:
        """Unregister a worker and settle the job's state; return the job's new state.

        ``stop`` is why the worker stopped early: ``"paused"`` or ``"aborted"`` (job-wide),
        or None when it ran out of work. The last worker out of a job with nothing left to
        send marks it ``completed``. Deliveries this worker still had in ``sending`` (an
        abandoned message) stay there: the next run treats them as in doubt.
        """
        with self._write() as conn:
            job_id = conn.execute(
                sa.select(workers.c.job_id).where(workers.c.id == worker_id)
            ).scalar_one()
            # the job row first: two workers finishing at once settle the state one by one
            job = self._job(conn, job_id, lock=True)
            conn.execute(workers.update().where(workers.c.id == worker_id).values(stopped_at=now))
            if job.state != JobState.RUNNING:
                return job.state  # cancelled, or paused/aborted by another worker
            if stop is not None:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(state=stop, error=error, finished_at=None)
                )
                return stop
            others = conn.execute(
                sa.select(sa.func.count())
                .select_from(workers)
                .where(workers.c.job_id == job_id, workers.c.stopped_at.is_(None))
            ).scalar_one()
            left = conn.execute(
                sa.select(sa.func.count())
                .select_from(deliveries)
                .where(deliveries.c.job_id == job_id, deliveries.c.state.in_(_HELD))
            ).scalar_one()
            if left == 0:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(state=JobState.COMPLETED, finished_at=now, error=None)
                )
                return JobState.COMPLETED
            if others == 0:
                # nothing claimable is left for us but work remains (e.g. abandoned): pause
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(state=JobState.PAUSED, error=error)
                )
                return JobState.PAUSED
            return JobState.RUNNING

    # -- the send loop's steps

    def next_due(self, job_id: int, *, now: float) -> float | None:
        """Seconds until the next pending delivery is due (0 = now), or None when nothing
        is pending. A plain read: it takes no lock."""
        with self._read() as conn:
            due = conn.execute(_stmt_min_due(), {"b_job": job_id}).scalar()
        if due is None:
            return None
        return max(0.0, float(due) - now)

    def claim(
        self, job_id: int, worker_id: str, *, now: float, settle: Outcome | None = None
    ) -> ClaimResult:
        """Claim the next due pending delivery for ``worker_id``: mark it ``sending`` and
        count the attempt, committed before the provider is called.

        ``settle``: the outcome of this worker's previous delivery, committed in the same
        transaction (first), so a worker sending back to back pays one commit per message;
        the previous outcome is still durable before the next message goes out.
        """
        with self._write() as conn:
            if settle is not None:
                self._settle(conn, settle, worker_id)
            job = conn.execute(_stmt_claim_context(), {"b_job": job_id, "b_worker": worker_id})
            state, dedupe_key, stopped_at = job.one()
            if state != JobState.RUNNING:
                return Stop(str(state))
            if stopped_at is not None:
                # other workers took this one for gone (its heartbeat had gone stale) and
                # took over its deliveries: it must not claim more
                return Stop(WORKER_STOPPED)
            while True:
                row = conn.execute(_stmt_next_due_row(), {"b_job": job_id, "b_now": now}).first()
                if row is None:
                    break
                values = row._asdict()
                if dedupe_key is not None and self._taken_elsewhere(conn, values, dedupe_key):
                    continue  # skipped: another job under the key sent it or is sending it
                attempts = values["attempts"] + 1
                conn.execute(
                    _stmt_mark_sending(),
                    {"b_id": values["id"], "b_attempts": attempts, "b_worker": worker_id},
                )
                values.update(state=_SENDING, attempts=attempts, worker_id=worker_id)
                return Claimed(delivery_from_row(values))
            due = conn.execute(_stmt_min_due(), {"b_job": job_id}).scalar()
            if due is not None:
                return Wait(max(0.0, float(due) - now))
            return Stop(JobState.RUNNING, finished=True)

    def _taken_elsewhere(self, conn: Connection, d: dict[str, Any], dedupe_key: str) -> bool:
        """Whether another job under ``dedupe_key`` has sent, or is sending, this delivery's
        address (e.g. `retry` of an older job after a newer cron run; the claim-time dedupe,
        ``reads.DEDUPE_TAKEN_AT_CLAIM``): if so it becomes ``skipped`` with the reason, in
        the claim's transaction."""
        params = {"key": dedupe_key, "email": d["email_key"], "job": d["job_id"]}
        rows = _query(conn)(SQL_TAKEN_AT_CLAIM, params)
        if not rows:
            return False
        reason = dedupe_reason(dedupe_key, rows[0]["job"], rows[0]["state"])
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == d["id"])
            .values(state=DeliveryState.SKIPPED, last_error=reason)
        )
        return True

    def record(self, outcome: Outcome, worker_id: str) -> bool:
        """Commit one delivery's outcome. False when the delivery is no longer this
        worker's (another worker took it over as in doubt): nothing is changed then."""
        with self._write() as conn:
            return self._settle(conn, outcome, worker_id)

    def _settle(self, conn: Connection, outcome: Outcome, worker_id: str) -> bool:
        params = {f"v_{k}": v for k, v in outcome.values}
        params.update(o_id=outcome.delivery_id, o_worker=worker_id)
        updated = conn.execute(_stmt_outcome(tuple(k for k, _ in outcome.values)), params)
        if updated.rowcount and outcome.is_sent:
            conn.execute(_stmt_worker_sent(), {"b_worker": worker_id})
        elif updated.rowcount and dict(outcome.values).get("state") == _PENDING:
            self._cancel_if_job_cancelled(conn, outcome.delivery_id)
        return bool(updated.rowcount)

    def _cancel_if_job_cancelled(self, conn: Connection, delivery_id: int) -> None:
        """A delivery handed back to ``pending`` (retry later, or released untried) after
        its job was cancelled is cancelled too, or it would stay pending forever."""
        cancelled_jobs = sa.select(jobs.c.id).where(jobs.c.state == JobState.CANCELLED)
        conn.execute(
            deliveries.update()
            .where(
                deliveries.c.id == delivery_id,
                deliveries.c.state == _PENDING,
                deliveries.c.job_id.in_(cancelled_jobs),
            )
            .values(state=DeliveryState.CANCELLED)
        )

    def release(self, delivery_id: int, worker_id: str) -> bool:
        """Give a claimed delivery back untried (the job stopped before it was sent)."""
        with self._write() as conn:
            updated = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.id == delivery_id,
                    deliveries.c.state == _SENDING,
                    deliveries.c.worker_id == worker_id,
                )
                .values(state=_PENDING, attempts=deliveries.c.attempts - 1)
            ).rowcount
            if updated:
                self._cancel_if_job_cancelled(conn, delivery_id)
        return bool(updated)

    # -- commands

    def cancel(self, job_id: int, *, now: float, alive: WorkerAlive | None = None) -> int:
        """Cancel a job: pending deliveries become ``cancelled``, and so do deliveries left
        in ``sending`` by workers that are gone (``alive`` says which are not; a crashed
        run's message in flight is never resumed now). A live worker finishes the message
        it is sending and stops before the next. Returns how many were cancelled."""
        with self._write() as conn:
            job = self._job(conn, job_id, lock=True)
            if job.state in (JobState.COMPLETED, JobState.CANCELLED):
                raise JobStateError(f"job {job_id} is already {job.state}")
            current = self._workers(conn, job_id, live_only=True)
            live = [w.id for w in current if alive is None or alive(w)]
            gone_sending = sa.and_(deliveries.c.state == _SENDING)
            if live:
                gone_sending = sa.and_(gone_sending, deliveries.c.worker_id.not_in(live))
            count = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.job_id == job_id,
                    sa.or_(deliveries.c.state == _PENDING, gone_sending),
                )
                .values(state=DeliveryState.CANCELLED)
            ).rowcount
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(state=JobState.CANCELLED, finished_at=now)
            )
        return int(count)

    def retry_failed(self, job_id: int) -> int:
        """Put a job's failed deliveries back to pending with fresh attempts."""
        with self._write() as conn:
            job = self._job(conn, job_id, lock=True)
            if job.state == JobState.CANCELLED:
                raise JobStateError(f"job {job_id} is cancelled; start a new job instead")
            count = conn.execute(
                deliveries.update()
                .where(deliveries.c.job_id == job_id, deliveries.c.state == DeliveryState.FAILED)
                .values(state=_PENDING, attempts=0, next_attempt_at=0.0)
            ).rowcount
            if count and job.state == JobState.COMPLETED:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(state=JobState.QUEUED, finished_at=None)
                )
        return int(count)

    # -- the shared rate limit

    def reserve_slot(
        self, key: str, reserve: Callable[[float | None], tuple[float, float]]
    ) -> float:
        """Run one GCRA step on the bucket ``key`` in one short write transaction.

        ``reserve(tat) -> (slot, new_tat)`` is the pure computation (see ratelimit.py); the
        caller sleeps until ``slot`` outside the transaction.
        """
        bucket = sa.select(rate_buckets.c.tat).where(rate_buckets.c.key == key).with_for_update()
        with self._write() as conn:
            tat = conn.execute(bucket).scalar()
            slot, new_tat = reserve(None if tat is None else float(tat))
            if tat is None and self.server:
                # first use: another worker may be creating the row right now; whoever
                # loses reads the winner's row (locked) and computes again
                created = conn.execute(
                    pg_insert(rate_buckets)
                    .values(key=key, tat=new_tat)
                    .on_conflict_do_nothing(index_elements=[rate_buckets.c.key])
                    .returning(rate_buckets.c.key)
                ).first()
                if created is not None:
                    return slot
                tat = conn.execute(bucket).scalar_one()
                slot, new_tat = reserve(float(tat))
            elif tat is None:
                conn.execute(rate_buckets.insert().values(key=key, tat=new_tat))
                return slot
            conn.execute(rate_buckets.update().where(rate_buckets.c.key == key).values(tat=new_tat))
        return slot


if TYPE_CHECKING:

    def _implements_the_contract(store: Store) -> JobStore:  # checked by mypy
        return store
