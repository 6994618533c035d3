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
connection. What happens after the send (events, the suppression list, processed bounce
messages) and the API tokens are :mod:`bulkmail.store.aftersend`'s, a mixin of ``Store``.

Times are stored as POSIX seconds (floats). The worker leases (registration, heartbeats,
staleness, take-overs) and the rate slots use the store's time, read inside the transaction
that needs it: on PostgreSQL the database's clock (``clock_timestamp()``), one clock for
every host however wrong their own clocks are; on SQLite (one host) the local clock. A
``now`` passed in by the caller, or a ``clock`` given to the store, overrides it, so the
logic that depends on time can be tested with fixed times.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from bulkmail.errors import JobStateError, StoreError
from bulkmail.ratelimit import gcra_reserve
from bulkmail.store.aftersend import AfterSend
from bulkmail.store.engine import open_engine
from bulkmail.store.reads import (
    SQL_TAKEN_AMONG,
    SQL_TAKEN_AT_CLAIM,
    Query,
    StoreReads,
    read_job,
    read_workers,
    suppression_from_row,
)
from bulkmail.store.records import (
    WORKER_STOPPED,
    BatchClaimResult,
    Claimed,
    ClaimedBatch,
    ClaimResult,
    DeliveryRecord,
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
    creating_error,
    creating_refusal,
    dedupe_reason,
    delivery_from_row,
    message_id,
    pick_dedupe,
    suppression_reason,
)
from bulkmail.store.schema import (
    create_schema,
    deliveries,
    jobs,
    rate_buckets,
    sends,
    suppressions,
    workers,
)

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
    """The job's state and dedupe key, whether the claiming worker was stopped, what the
    caps need (the account, the job's caps, whether the job says it is waiting), and what
    the suppression check needs (the job's --include-suppressed, whether any address is
    on the list)."""
    worker = sa.select(workers.c.stopped_at).where(workers.c.id == sa.bindparam("b_worker"))
    return sa.select(
        jobs.c.state,
        jobs.c.dedupe_key,
        worker.scalar_subquery(),
        jobs.c.account,
        jobs.c.per_hour,
        jobs.c.per_day,
        jobs.c.waiting_for,
        jobs.c.include_suppressed,
        # an empty suppression list (most stores, most days) spares each claim its lookup
        sa.exists(sa.select(suppressions.c.email_key)).label("any_suppressed"),
    ).where(jobs.c.id == sa.bindparam("b_job"))


@functools.cache
def _stmt_suppressed_among() -> sa.Select[Any]:
    """The suppression list's entries for some addresses (``b_keys``, lower-cased): one
    lookup by the primary key per claimed batch."""
    return sa.select(suppressions).where(
        suppressions.c.email_key.in_(sa.bindparam("b_keys", expanding=True))
    )


@functools.cache
def _stmt_skip() -> sa.Update:
    """A claimed-for row that is not sent after all: ``skipped``, with the reason."""
    return (
        deliveries.update()
        .where(deliveries.c.id == sa.bindparam("b_id"))
        .values(state=DeliveryState.SKIPPED, last_error=sa.bindparam("b_reason"))
    )


@functools.cache
def _stmt_next_due_rows() -> sa.Select[Any]:
    """Up to ``b_limit`` due pending rows in claim order; other workers' claims in progress
    are skipped, not waited for (PostgreSQL)."""
    return (
        sa.select(deliveries)
        .where(
            deliveries.c.job_id == sa.bindparam("b_job"),
            deliveries.c.state == _PENDING,
            deliveries.c.next_attempt_at <= sa.bindparam("b_now"),
        )
        .order_by(deliveries.c.next_attempt_at, deliveries.c.position)
        .limit(sa.bindparam("b_limit"))
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


@functools.cache
def _stmt_send_log() -> sa.Insert:
    return sends.insert().values(
        account=sa.bindparam("b_account"),
        at=sa.bindparam("b_at"),
        delivery_id=sa.bindparam("b_id"),
        worker_id=sa.bindparam("b_worker"),
    )


def _this_claims_send() -> sa.ScalarSelect[Any]:
    """The ``sends`` row of the worker's current claim of a delivery: its latest one (a
    worker holds one claim of a delivery at a time; earlier rows are earlier attempts)."""
    return (
        sa.select(sa.func.max(sends.c.id))
        .where(
            sends.c.delivery_id == sa.bindparam("s_id"),
            sends.c.worker_id == sa.bindparam("s_worker"),
        )
        .scalar_subquery()
    )


@functools.cache
def _stmt_send_untried() -> sa.Delete:
    """A claim given back untried leaves the caps' log: it never reached the provider."""
    return sends.delete().where(sends.c.id == _this_claims_send())


@functools.cache
def _stmt_send_sent() -> sa.Update:
    """A sent message's log row moves from its claim's time to when the send ended (never
    earlier): the message reached the server between the two, so each window the caps count
    from then on holds every message the server saw in it."""
    return (
        sends.update()
        .where(sends.c.id == _this_claims_send(), sends.c.at < sa.bindparam("s_at"))
        .values(at=sa.bindparam("s_at"))
    )


@functools.cache
def _stmt_send_prune() -> sa.Delete:
    return sends.delete().where(
        sends.c.account == sa.bindparam("b_account"), sends.c.at <= sa.bindparam("b_before")
    )


HOUR, DAY = 3600.0, 86400.0
THROTTLE_PAUSE = 1.0  # seconds the account pauses after a throttling reply without Retry-After
THROTTLE_FLOOR = 1.0 / 64  # the slowest the rate factor gets
THROTTLE_RECOVERY = 30.0  # seconds without throttling over which the factor doubles


def rate_factor(factor: float | None, not_before: float | None, now: float) -> float:
    """The account's rate factor at ``now``: halved by each throttling reply, it doubles
    back every ``THROTTLE_RECOVERY`` seconds after the pause ends, up to 1 (gradual)."""
    if factor is None or factor >= 1.0:
        return 1.0
    since = max(0.0, now - (not_before or now))
    return float(min(1.0, factor * 2.0 ** (since / THROTTLE_RECOVERY)))


@functools.cache
def _stmt_worker_sent_n() -> sa.Update:
    return (
        workers.update()
        .where(workers.c.id == sa.bindparam("b_worker"))
        .values(sent=workers.c.sent + sa.bindparam("b_n"))
    )


# the database's clock, as POSIX seconds: the time source of a server store
_SQL_DB_NOW = sa.text("SELECT extract(epoch from clock_timestamp())")


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


# job creation: rows per write transaction, and the columns of a new delivery in the order
# create_job builds them
CREATE_BATCH = 5000
_NEW_COLUMNS = (
    "job_id", "position", "row", "email", "email_key", "name", "fields", "state", "attempts",
    "last_error", "next_attempt_at", "message_id", "in_doubt",
)  # fmt: skip
_KEY, _STATE, _ERROR = (_NEW_COLUMNS.index(c) for c in ("email_key", "state", "last_error"))
_SQLITE_INSERT = (
    f"INSERT INTO deliveries ({', '.join(_NEW_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _NEW_COLUMNS)})"
)
_SQL_ANY_SUPPRESSION = sa.text("SELECT 1 FROM suppressions LIMIT 1")
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_JSON_STR = json.encoder.encode_basestring  # what _JSON writes a str as (ensure_ascii=False)


_JSON_KEYS: dict[tuple[str, ...], list[str]] = {}  # the columns of a source -> '"key":'s


def _fields_json(fields: Mapping[str, Any]) -> str:
    """``_JSON.encode(dict(fields))``: a delivery's fields (text by text, as a source gives
    them) written directly, the keys (the same columns on every row) encoded once;
    anything else (a number, a key that is not text) by _JSON."""
    try:
        keys = tuple(fields)
        prefixes = _JSON_KEYS.get(keys)
        if prefixes is None:
            prefixes = [_JSON_STR(k) + ":" for k in keys]
            if len(_JSON_KEYS) < 64:
                _JSON_KEYS[keys] = prefixes
        return "{" + ",".join(map(operator.add, prefixes, map(_JSON_STR, fields.values()))) + "}"
    except TypeError:
        return _JSON.encode(dict(fields))


def _creating_failpoint() -> int:
    """Crash-test hook: ``BULKMAIL_FAILPOINT=creating:N`` kills the process with SIGKILL
    right after the N-th batch of a new job's deliveries is committed (as ``kill -9``)."""
    point, _, count = os.environ.get("BULKMAIL_FAILPOINT", "").partition(":")
    return int(count or 1) if point == "creating" else 0


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Store(StoreReads, AfterSend):
    """Every read and write of the job store. Thread-safe: each call takes its own
    connection from the pool and holds a transaction only for its own duration."""

    def __init__(
        self,
        engine: Engine,
        location: str,
        *,
        url: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.engine = engine
        self.location = location  # for messages: never shows a password
        self.url = url or location  # to hand to a worker process: may hold a password
        self.server = engine.dialect.name == "postgresql"  # several hosts may share it
        self.created = False  # open_store made this store just now
        # the leases' and rate slots' time source when a test injects one (see _time)
        self.clock = clock

    def _time(
        self, conn: Connection, now: float | None, caller: Callable[[], float] | None = None
    ) -> float:
        """The store's time, read in the transaction of ``conn``: ``now`` when the caller
        gives one, else the injected clock, else the database's clock on a server store
        (shared by every host), else (SQLite: one host) the caller's clock or this host's."""
        if now is not None:
            return now
        if self.clock is not None:
            return self.clock()
        if self.server:
            return float(conn.execute(_SQL_DB_NOW).scalar_one())
        return (caller or time.time)()

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
        self,
        new: NewJob,
        recipients: Iterable[NewDelivery],
        *,
        now: float,
        domain: str,
        include_suppressed: bool = False,
    ) -> int:
        """Create a job and its deliveries, streaming ``recipients`` in batches of
        ``CREATE_BATCH``, each batch its own short write transaction (workers of other jobs
        on the same SQLite file go on between two batches), under the job state ``creating``
        that no worker runs; the job becomes ``queued`` once every delivery is in. Any
        exception raised while iterating (bad row, template error) deletes what was
        written: bad input never leaves a job behind. A process killed meanwhile leaves a
        ``creating`` job that ``resume`` refuses, with the error telling to cancel it.

        Addresses another job under the same ``dedupe_key`` has sent or still holds (earlier
        batches of this job are rows like any other) become ``skipped`` with the reason, and
        so do addresses on the suppression list unless ``include_suppressed`` (or
        ``new.include_suppressed``; the job records it: its claims skip an address
        suppressed later unless it is set).
        """
        include_suppressed = include_suppressed or new.include_suppressed
        token = secrets.token_hex(4)
        with self._write() as conn:
            inserted = conn.execute(
                jobs.insert()
                .values(
                    token=token,
                    state=JobState.CREATING,
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
                    created_by=new.created_by,
                    name=new.name,
                    include_suppressed=include_suppressed,
                    total=0,
                    created_at=now,
                    windows=_json(list(new.windows)) if new.windows else None,
                    tz=new.tz,
                    not_before=new.not_before,
                    not_after=new.not_after,
                    per_hour=new.per_hour,
                    per_day=new.per_day,
                    recheck_url=new.recheck_url,
                    recheck_query=new.recheck_query,
                )
                .returning(jobs.c.id)
            )
            job_id = int(inserted.scalar_one())
            conn.execute(
                jobs.update().where(jobs.c.id == job_id).values(error=creating_error(job_id))
            )
        try:
            total = self._create_deliveries(
                job_id, token, new.dedupe_key, recipients, domain, include_suppressed
            )
        except BaseException:
            self._forget_job(job_id)
            raise
        later = new.not_before is not None and new.not_before > now
        with self._write() as conn:
            flipped = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.state == JobState.CREATING)
                .values(
                    state=JobState.SCHEDULED if later else JobState.QUEUED, total=total, error=None
                )
            ).rowcount
            if not flipped:  # cancelled while being created: nothing of it is sent
                conn.execute(
                    deliveries.update()
                    .where(deliveries.c.job_id == job_id, deliveries.c.state == _PENDING)
                    .values(state=DeliveryState.CANCELLED)
                )
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(total=total))
        return job_id

    def _create_deliveries(
        self,
        job_id: int,
        token: str,
        dedupe_key: str | None,
        recipients: Iterable[NewDelivery],
        domain: str,
        include_suppressed: bool = False,
    ) -> int:
        """Insert the job's deliveries batch by batch; return how many. A batch is built
        outside any transaction (reading and rendering the list takes most of the time):
        each transaction holds the write lock only to insert it."""
        failpoint = _creating_failpoint()
        pending, skipped = str(_PENDING), str(DeliveryState.SKIPPED)
        batch: list[list[Any]] = []
        position = batches = 0
        for rcpt in recipients:
            position += 1
            email = rcpt.email
            reason = rcpt.skip_reason
            batch.append(
                [
                    job_id,
                    position,
                    rcpt.row,
                    email,
                    email.lower(),
                    rcpt.name,
                    _fields_json(rcpt.fields),
                    skipped if reason else pending,
                    0,
                    reason,
                    0.0,
                    message_id(job_id, position, token, domain),
                    False,
                ]
            )
            if len(batch) >= CREATE_BATCH:
                self._insert_batch(job_id, dedupe_key, batch, position, include_suppressed)
                batch = []
                batches += 1
                if batches == failpoint:
                    os.kill(os.getpid(), signal.SIGKILL)
        if batch:
            self._insert_batch(job_id, dedupe_key, batch, position, include_suppressed)
        return position

    def _insert_batch(
        self,
        job_id: int,
        dedupe_key: str | None,
        batch: list[list[Any]],
        total: int,
        include_suppressed: bool = False,
    ) -> None:
        with self._write() as conn:
            if not include_suppressed:
                self._mark_suppressed(conn, batch)
            if dedupe_key:
                self._mark_already_sent(conn, dedupe_key, batch)
            if self.server:
                conn.execute(
                    deliveries.insert(), [dict(zip(_NEW_COLUMNS, r, strict=True)) for r in batch]
                )
            else:  # the driver's executemany: no statement compiled per batch
                conn.exec_driver_sql(_SQLITE_INSERT, [tuple(r) for r in batch])
            # the progress, for `status`
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(total=total))

    def _forget_job(self, job_id: int) -> None:
        """Delete a job whose creation failed, and what was written of it (best effort: a
        store gone meanwhile leaves it ``creating``, which nothing runs)."""
        try:
            with self._write() as conn:
                conn.execute(deliveries.delete().where(deliveries.c.job_id == job_id))
                conn.execute(jobs.delete().where(jobs.c.id == job_id))
        except (StoreError, sa.exc.SQLAlchemyError):
            pass

    def _mark_suppressed(self, conn: Connection, batch: list[list[Any]]) -> None:
        """Skip the batch's addresses on the suppression list, with why they are there."""
        if conn.execute(_SQL_ANY_SUPPRESSION).first() is None:
            return  # an empty list (the usual case): no need to look up every address
        keys = {row[_KEY] for row in batch if row[_STATE] == _PENDING}
        if not keys:
            return
        rows = _query(conn)(
            "SELECT * FROM suppressions WHERE email_key IN :keys", {"keys": sorted(keys)}
        )
        if not rows:
            return
        found = {row["email_key"]: suppression_from_row(row) for row in rows}
        for row in batch:
            held = found.get(row[_KEY]) if row[_STATE] == _PENDING else None
            if held is not None:
                row[_STATE] = str(DeliveryState.SKIPPED)
                row[_ERROR] = suppression_reason(held)

    def _mark_already_sent(self, conn: Connection, dedupe_key: str, batch: list[list[Any]]) -> None:
        """Skip the batch's addresses that another job under ``dedupe_key`` has sent or
        still holds (a paused cron run's pending reminders are not sent twice)."""
        keys = {row[_KEY] for row in batch if row[_STATE] == _PENDING}
        if not keys:
            return
        rows = _query(conn)(SQL_TAKEN_AMONG, {"key": dedupe_key, "keys": sorted(keys)})
        taken = pick_dedupe((row["email_key"], row["job"], row["state"]) for row in rows)
        for row in batch:
            if row[_STATE] == _PENDING and row[_KEY] in taken:
                job, state = taken[row[_KEY]]
                row[_STATE] = str(DeliveryState.SKIPPED)
                row[_ERROR] = dedupe_reason(dedupe_key, job, state)

    def _job(self, conn: Connection, job_id: int, *, lock: bool = False) -> JobRecord:
        """The job; ``lock``: hold its row until the transaction ends (``FOR UPDATE`` on
        PostgreSQL; on SQLite the write transaction already excludes other writers)."""
        return read_job(_query(conn), job_id, for_update=lock and self.server)

    def set_log_path(self, job_id: int, path: str) -> None:
        with self._write() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(log_path=path))

    # -- workers

    def _workers(
        self,
        conn: Connection,
        job_id: int,
        *,
        live_only: bool = False,
        read_at: float | None = None,
    ) -> list[WorkerRecord]:
        """The job's workers; ``read_at``: the store's time of this read, which liveness
        then measures their heartbeats against (``liveness.worker_alive``)."""
        found = read_workers(_query(conn), job_id, live_only=live_only)
        if read_at is None:
            return found
        return [dataclasses.replace(w, read_at=read_at) for w in found]

    def register_worker(
        self,
        job_id: int,
        *,
        worker_id: str,
        host: str,
        pid: int,
        now: float | None = None,
        alive: WorkerAlive,
        exclusive: bool = True,
        host_id: str | None = None,
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
            if job.state == JobState.CREATING:
                raise JobStateError(creating_refusal(job_id))
            now = self._time(conn, now)
            current = self._workers(conn, job_id, live_only=True, read_at=now)
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
                    host_id=host_id,
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

    def heartbeat(self, worker_id: str, *, now: float | None = None) -> str:
        """Renew a worker's heartbeat; return its job's state (so a cancel is noticed), or
        ``WORKER_STOPPED`` when other workers took this one for gone (its heartbeat had gone
        stale) and took over its deliveries: it must stop before its next message.

        A renewal and a take-over never cross: on PostgreSQL the heartbeat holds the job
        row (``FOR KEY SHARE``) that a take-over holds ``FOR UPDATE`` while it judges and
        acts (on SQLite every write is serialised already), and a stopped worker's
        heartbeat is not renewed. So once a heartbeat answers ``running``, nobody takes the
        worker for gone before its heartbeat has aged ``stale_after`` by the store's clock,
        which is what the worker's fencing counts on (``EmailManager._still_owner``)."""
        with self._write() as conn:
            job_id = conn.execute(
                sa.select(workers.c.job_id).where(workers.c.id == worker_id)
            ).scalar()
            if job_id is None:
                return "None"  # no such worker
            if self.server:
                conn.execute(
                    sa.select(jobs.c.id).where(jobs.c.id == job_id).with_for_update(key_share=True)
                )
            now = self._time(conn, now)
            conn.execute(
                workers.update()
                .where(workers.c.id == worker_id, workers.c.stopped_at.is_(None))
                .values(heartbeat_at=now)
            )
            row = conn.execute(
                sa.select(jobs.c.state, workers.c.stopped_at)
                .join(workers, workers.c.job_id == jobs.c.id)
                .where(workers.c.id == worker_id)
            ).first()
        if row is None:
            return "None"  # no such worker
        return WORKER_STOPPED if row.stopped_at is not None else str(row.state)

    def reclaim(
        self, job_id: int, *, worker_id: str, now: float | None = None, alive: WorkerAlive
    ) -> Reclaimed:
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
            current = self._workers(conn, job_id, live_only=True, read_at=self._time(conn, now))
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
            at = self._time(conn, now)
            current = self._workers(conn, job_id, live_only=True, read_at=at)
            live_workers = [w for w in current if is_alive(w)]
            reclaimed = self._take_over(conn, job_id, current, live_workers, now=at)
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
        self,
        worker_id: str,
        *,
        now: float,
        stop: str | None,
        error: str | None,
        local: bool | None = None,
        alive: WorkerAlive | None = None,
    ) -> str:
        """Unregister a worker and settle the job's state; return the job's new state.

        ``stop`` is why the worker stopped early: ``"paused"`` or ``"aborted"``, or None when
        it ran out of work. A ``local`` stop (default: ``paused`` is, ``aborted`` is not) is
        the worker's own trouble (its signal, its connection to the provider or the store):
        while another live worker (``alive`` says which; default: every one not stopped)
        remains on the job, the worker only leaves it and the others go on; the last live
        worker's stop applies to the job. Any other stop applies to the job at once. The last
        worker out of a job with nothing left to send marks it ``completed``. Deliveries this
        worker still had in ``sending`` (an abandoned message) stay there: the next run
        treats them as in doubt.
        """
        local = stop == JobState.PAUSED if local is None else local
        with self._write() as conn:
            job_id = conn.execute(
                sa.select(workers.c.job_id).where(workers.c.id == worker_id)
            ).scalar_one()
            # the job row first: two workers finishing at once settle the state one by one
            job = self._job(conn, job_id, lock=True)
            conn.execute(workers.update().where(workers.c.id == worker_id).values(stopped_at=now))
            if job.state != JobState.RUNNING:
                return job.state  # cancelled, or paused/aborted by another worker
            if stop is not None and local:
                others_live = [
                    w
                    for w in self._workers(conn, job_id, live_only=True)
                    if w.id != worker_id and (alive is None or alive(w))
                ]
                if others_live:
                    stop = None  # this worker leaves; the others go on with the job
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
            got = self._claim_due(conn, job_id, worker_id, now=now, limit=1)
        return Claimed(got[0]) if isinstance(got, list) else got

    def _account_hold(
        self,
        conn: Connection,
        account: str,
        per_hour: int | None,
        per_day: int | None,
        at: float,
    ) -> Wait | None:
        """Whether the account may send one more message at ``at``: None, or the ``Wait``
        until it may (a server's throttling pause, or the time the oldest send of a full
        rolling hour or day leaves it). Holds the account's ``rate_buckets`` row (PostgreSQL:
        ``FOR UPDATE``; SQLite: the write transaction) so two claims never both count the
        last free slot."""
        row = self._bucket_row(conn, account, create=bool(per_hour or per_day))
        if row is not None and row.not_before is not None and row.not_before > at:
            return Wait(float(row.not_before) - at, f"the server throttled {account}; slowing down")
        waits: list[tuple[float, str]] = []
        for cap, span, name in ((per_hour, HOUR, "hourly"), (per_day, DAY, "daily")):
            if not cap:
                continue
            window = sa.and_(sends.c.account == account, sends.c.at > at - span)
            count = conn.execute(sa.select(sa.func.count()).where(window)).scalar_one()
            if count < cap:
                continue
            # the send whose leaving the window frees a slot: the (count - cap + 1)-th oldest
            oldest = conn.execute(
                sa.select(sends.c.at)
                .where(window)
                .order_by(sends.c.at)
                .offset(count - cap)
                .limit(1)
            ).scalar_one()
            waits.append((float(oldest) + span - at, f"{name} cap {count}/{cap} on {account}"))
        if not waits:
            return None
        seconds, why = max(waits)
        return Wait(max(seconds, 0.001), why)

    def _cap_room(
        self,
        conn: Connection,
        account: str,
        per_hour: int | None,
        per_day: int | None,
        at: float,
    ) -> int:
        """How many more messages the account's caps let go out at ``at`` (a large number
        when it has none); the caller holds the account's row (``_account_hold``)."""
        room = 1 << 30
        for cap, span in ((per_hour, HOUR), (per_day, DAY)):
            if cap:
                window = sa.and_(sends.c.account == account, sends.c.at > at - span)
                count = conn.execute(sa.select(sa.func.count()).where(window)).scalar_one()
                room = min(room, max(0, cap - count))
        return room

    def _bucket_row(self, conn: Connection, key: str, *, create: bool) -> Any:
        """The account's bucket row (``not_before``, ``factor``, ``tat``), locked; when
        ``create``, made first if missing (once, however many race), so that its lock
        serialises every claim that counts the account's caps."""
        bucket = (
            sa.select(rate_buckets.c.not_before, rate_buckets.c.factor, rate_buckets.c.tat)
            .where(rate_buckets.c.key == key)
            .with_for_update()
        )
        row = conn.execute(bucket).first()
        if row is not None or not create:
            return row
        if self.server:
            conn.execute(
                pg_insert(rate_buckets)
                .values(key=key, tat=0.0)
                .on_conflict_do_nothing(index_elements=[rate_buckets.c.key])
            )
        else:
            conn.execute(rate_buckets.insert().values(key=key, tat=0.0))
        return conn.execute(bucket).first()

    def throttle(
        self,
        key: str,
        *,
        retry_after: float | None,
        now: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> float:
        """A server refused the account as too fast: no claim on it before the pause ends
        (``retry_after``, else ``THROTTLE_PAUSE``), and its rate factor halves (down to
        ``THROTTLE_FLOOR``). Returns the pause in seconds."""
        with self._write() as conn:
            at = self._time(conn, now, clock)
            row = self._bucket_row(conn, key, create=True)
            factor = rate_factor(row.factor, row.not_before, at)
            pause = retry_after if retry_after is not None and retry_after > 0 else THROTTLE_PAUSE
            until = max(float(row.not_before or 0.0), at + pause)
            conn.execute(
                rate_buckets.update()
                .where(rate_buckets.c.key == key)
                .values(not_before=until, factor=max(THROTTLE_FLOOR, factor / 2))
            )
        return until - at

    def set_waiting(self, job_id: int, why: str | None, until: float | None) -> None:
        """Record why the job's worker holds it back and until when (None: it does not)."""
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(waiting_for=why, waiting_until=until if why else None)
            )

    def expire(self, job_id: int) -> int:
        """``--not-after`` has passed: the job's ``pending`` deliveries become ``expired``
        (never sent); returns how many. Deliveries in flight finish as they do."""
        with self._write() as conn:
            count = conn.execute(
                deliveries.update()
                .where(deliveries.c.job_id == job_id, deliveries.c.state == _PENDING)
                .values(state=DeliveryState.EXPIRED, last_error="--not-after passed: not sent")
            ).rowcount
        return int(count)

    def skip_pending(self, job_id: int, emails: Iterable[str], reason: str) -> int:
        """The job's ``pending`` deliveries to ``emails`` (lower-cased) become ``skipped``
        with ``reason``; returns how many."""
        keys = sorted(set(emails))
        count = 0
        with self._write() as conn:
            for start in range(0, len(keys), 500):
                count += conn.execute(
                    deliveries.update()
                    .where(
                        deliveries.c.job_id == job_id,
                        deliveries.c.state == _PENDING,
                        deliveries.c.email_key.in_(keys[start : start + 500]),
                    )
                    .values(state=DeliveryState.SKIPPED, last_error=reason)
                ).rowcount
        return count

    def due_jobs(self, *, now: float | None = None) -> list[int]:
        """The jobs whose time has come (``bulkmail run-due``): ``scheduled`` ones whose
        ``not_before`` has passed, ``queued`` ones, and ``running`` ones (their workers may
        be gone; starting a worker on one a live worker holds is refused). Oldest first."""
        with self._read() as conn:
            at = self._time(conn, now)
            rows = conn.execute(
                sa.select(jobs.c.id)
                .where(
                    sa.or_(
                        sa.and_(
                            jobs.c.state == JobState.SCHEDULED,
                            sa.or_(jobs.c.not_before.is_(None), jobs.c.not_before <= at),
                        ),
                        jobs.c.state.in_((JobState.QUEUED, JobState.RUNNING)),
                    )
                )
                .order_by(jobs.c.id)
            )
            return [int(r[0]) for r in rows]

    def claim_batch(
        self,
        job_id: int,
        worker_id: str,
        *,
        now: float,
        limit: int,
        settle: Sequence[Outcome] = (),
    ) -> BatchClaimResult:
        """Claim up to ``limit`` due pending deliveries for ``worker_id`` in one transaction
        (after committing ``settle``): every one ``sending``, its attempt counted, before
        the batch request is made."""
        with self._write() as conn:
            if settle:
                self._settle_many(conn, settle, worker_id)
            got = self._claim_due(conn, job_id, worker_id, now=now, limit=limit)
        return ClaimedBatch(tuple(got)) if isinstance(got, list) else got

    def _claim_due(
        self, conn: Connection, job_id: int, worker_id: str, *, now: float, limit: int
    ) -> list[DeliveryRecord] | Wait | Stop:
        """The claim, in the caller's write transaction: up to ``limit`` due pending
        deliveries become ``sending`` under ``worker_id`` (attempt counted), never more
        than the account's caps leave room for, each logged in the account's ``sends``; a
        delivery whose address is on the suppression list (unless the job was created with
        --include-suppressed), or that another job under the dedupe key has sent or holds,
        is skipped instead, with the reason. ``Stop`` when the job no longer runs or this
        worker was taken for gone; ``Wait`` when a cap, a throttling pause or the next retry
        holds it back."""
        job = conn.execute(_stmt_claim_context(), {"b_job": job_id, "b_worker": worker_id})
        state, dedupe_key, stopped_at, account, per_hour, per_day, waiting, everyone, listed = (
            job.one()
        )
        if state != JobState.RUNNING:
            return Stop(str(state))
        if stopped_at is not None:
            # other workers took this one for gone (its heartbeat had gone stale) and took
            # over its deliveries: it must not claim more
            return Stop(WORKER_STOPPED)
        # the account's time: the database's clock on PostgreSQL (every host counts the caps
        # on one clock), the caller's on SQLite
        at = self._time(conn, None if self.server else now)
        held = self._account_hold(conn, account, per_hour, per_day, at)
        if held is not None:
            return held
        if limit > 1 and (per_hour or per_day):  # (one message: _account_hold made room)
            limit = min(limit, self._cap_room(conn, account, per_hour, per_day, at))
        claimed: list[dict[str, Any]] = []
        while len(claimed) < limit:
            wanted = limit - len(claimed)
            rows = conn.execute(
                _stmt_next_due_rows(), {"b_job": job_id, "b_now": now, "b_limit": wanted}
            ).all()
            fresh: list[dict[str, Any]] = []
            check = listed and not everyone and rows
            suppressed = self._skip_suppressed(conn, rows) if check else set()
            for row in rows:
                values = row._asdict()
                if values["id"] in suppressed:
                    continue  # skipped: put on the suppression list since the job was made
                if dedupe_key is not None and self._taken_elsewhere(conn, values, dedupe_key):
                    continue  # skipped: another job under the key sent it or is sending it
                values.update(state=_SENDING, attempts=values["attempts"] + 1, worker_id=worker_id)
                fresh.append(values)
            if fresh:
                conn.execute(
                    _stmt_mark_sending(),
                    [
                        {"b_id": v["id"], "b_attempts": v["attempts"], "b_worker": worker_id}
                        for v in fresh
                    ],
                )
                claimed.extend(fresh)
            if len(rows) < wanted or len(fresh) == len(rows):
                break  # no more due, or all taken: the next select would find nothing new
        if claimed:
            # the caps count these messages from now on, unless one is given back untried
            # (release, or an outcome ``given_back``): sent, failed, in flight or in doubt
            conn.execute(
                _stmt_send_log(),
                [
                    {"b_account": account, "b_at": at, "b_id": v["id"], "b_worker": worker_id}
                    for v in claimed
                ],
            )
            conn.execute(_stmt_send_prune(), {"b_account": account, "b_before": at - DAY})
            if waiting is not None:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(waiting_for=None, waiting_until=None)
                )
            return [delivery_from_row(v) for v in claimed]
        due = conn.execute(_stmt_min_due(), {"b_job": job_id}).scalar()
        if due is not None:
            return Wait(max(0.0, float(due) - now))
        return Stop(JobState.RUNNING, finished=True)

    def _skip_suppressed(self, conn: Connection, rows: Sequence[sa.Row[Any]]) -> set[int]:
        """Make the rows whose address is on the suppression list (added after the job was
        created: a complaint, an unsubscribe, a hard bounce, `suppress add`) ``skipped``
        with the reason job creation gives, in the claim's transaction; their ids. One
        lookup for the whole batch."""
        keys = sorted({row.email_key for row in rows})
        found = conn.execute(_stmt_suppressed_among(), {"b_keys": keys}).mappings().all()
        if not found:
            return set()
        held = {entry["email_key"]: suppression_from_row(dict(entry)) for entry in found}
        skipped = [
            {"b_id": row.id, "b_reason": suppression_reason(held[row.email_key])}
            for row in rows
            if row.email_key in held
        ]
        conn.execute(_stmt_skip(), skipped)
        return {int(s["b_id"]) for s in skipped}

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

    def record_many(self, outcomes: Sequence[Outcome], worker_id: str) -> int:
        """Commit a batch's outcomes in one transaction; how many were still this worker's.
        Outcomes of the same shape (sent, failed) go in one executemany each; one handed
        back to ``pending`` is settled on its own (its job may have been cancelled)."""
        if not outcomes:
            return 0
        with self._write() as conn:
            return self._settle_many(conn, outcomes, worker_id)

    def _settle_many(self, conn: Connection, outcomes: Sequence[Outcome], worker_id: str) -> int:
        """Settle outcomes in ``conn``'s transaction (see ``record_many``)."""
        changed = 0
        groups: dict[tuple[str, ...], list[Outcome]] = {}
        for outcome in outcomes:
            if dict(outcome.values).get("state") == _PENDING:
                changed += self._settle(conn, outcome, worker_id)
            else:
                groups.setdefault(tuple(k for k, _ in outcome.values), []).append(outcome)
        for keys, group in groups.items():
            params = [
                {
                    **{f"v_{k}": v for k, v in outcome.values},
                    "o_id": outcome.delivery_id,
                    "o_worker": worker_id,
                }
                for outcome in group
            ]
            # both drivers sum an executemany's rowcount over its parameter sets
            updated = int(conn.execute(_stmt_outcome(keys), params).rowcount)
            if group[0].is_sent:
                if updated:
                    conn.execute(_stmt_worker_sent_n(), {"b_worker": worker_id, "b_n": updated})
                self._log_sent(conn, group, worker_id)
            changed += updated
        return changed

    def _settle(self, conn: Connection, outcome: Outcome, worker_id: str) -> bool:
        params = {f"v_{k}": v for k, v in outcome.values}
        params.update(o_id=outcome.delivery_id, o_worker=worker_id)
        updated = conn.execute(_stmt_outcome(tuple(k for k, _ in outcome.values)), params)
        if outcome.is_sent:
            # (sent even when another worker took the delivery over meanwhile: it counts)
            self._log_sent(conn, [outcome], worker_id)
            if updated.rowcount:
                conn.execute(_stmt_worker_sent(), {"b_worker": worker_id})
        elif updated.rowcount and dict(outcome.values).get("state") == _PENDING:
            if outcome.given_back:
                self._log_untried(conn, outcome.delivery_id, worker_id)
            self._cancel_if_job_cancelled(conn, outcome.delivery_id)
        return bool(updated.rowcount)

    def _log_sent(self, conn: Connection, sent: Sequence[Outcome], worker_id: str) -> None:
        """Re-time the caps' log rows of sent messages to when they went out: the sender's
        ``sent_at`` on SQLite (the clock its claims use), the store's clock on a server."""
        at = self._time(conn, None) if self.server else None
        conn.execute(
            _stmt_send_sent(),
            [
                {
                    "s_id": o.delivery_id,
                    "s_worker": worker_id,
                    "s_at": at if at is not None else dict(o.values)["sent_at"],
                }
                for o in sent
            ],
        )

    @staticmethod
    def _log_untried(conn: Connection, delivery_id: int, worker_id: str) -> None:
        """Take the worker's claim of the delivery out of the caps' log (given back untried)."""
        conn.execute(_stmt_send_untried(), {"s_id": delivery_id, "s_worker": worker_id})

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
        """Give a claimed delivery back untried (the job stopped before it was sent, or the
        worker found at its fence that others took it over): the claim leaves the caps' log
        either way, and the delivery goes back to ``pending`` if it is still this worker's."""
        with self._write() as conn:
            self._log_untried(conn, delivery_id, worker_id)
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
        return self._gcra(key, lambda conn, tat: reserve(tat))

    def reserve_delay(
        self, key: str, rate: float, burst: int, *, clock: Callable[[], float] | None = None
    ) -> float:
        """One GCRA step (``ratelimit.gcra_reserve``) on the bucket ``key`` at the store's
        time, read inside the transaction that holds the bucket's row: the database's clock
        on PostgreSQL (every host computes its slot on one clock), ``clock`` (the caller's)
        on SQLite. Returns the seconds to wait from now, for the caller to wait on its own
        clock (a relative delay means the same on every host)."""
        at: list[float] = []

        def step(conn: Connection, tat: float | None) -> tuple[float, float]:
            if not at:
                at.append(self._time(conn, None, clock))
            slowed = rate * rate_factor(*throttled.get(key, (None, None)), at[0])
            return gcra_reserve(tat, at[0], slowed, burst)

        throttled: dict[str, tuple[float | None, float | None]] = {}
        slot = self._gcra(key, step, throttled)
        return max(0.0, slot - at[0])

    def _gcra(
        self,
        key: str,
        reserve: Callable[[Connection, float | None], tuple[float, float]],
        throttled: dict[str, tuple[float | None, float | None]] | None = None,
    ) -> float:
        """``throttled``: filled with the bucket's (factor, not_before) before ``reserve``
        runs, for a caller that slows the rate by it."""
        bucket = sa.select(rate_buckets.c.tat).where(rate_buckets.c.key == key).with_for_update()
        with self._write() as conn:
            if throttled is not None:
                row = conn.execute(
                    sa.select(rate_buckets.c.factor, rate_buckets.c.not_before).where(
                        rate_buckets.c.key == key
                    )
                ).first()
                if row is not None:
                    throttled[key] = (row.factor, row.not_before)
            tat = conn.execute(bucket).scalar()
            slot, new_tat = reserve(conn, None if tat is None else float(tat))
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
                slot, new_tat = reserve(conn, float(tat))
            elif tat is None:
                conn.execute(rate_buckets.insert().values(key=key, tat=new_tat))
                return slot
            conn.execute(rate_buckets.update().where(rate_buckets.c.key == key).values(tat=new_tat))
        return slot


if TYPE_CHECKING:

    def _implements_the_contract(store: Store) -> JobStore:  # checked by mypy
        return store
