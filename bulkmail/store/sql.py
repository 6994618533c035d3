"""The job store: every job, every delivery, every worker and the shared rate-limit rows.

All SQL of bulkmail lives here, written with SQLAlchemy 2 Core. The store is addressed by a
URL; a plain path or ``sqlite:///...`` is the embedded default. On SQLite the file is
created with mode 0600, runs in WAL mode with ``synchronous=FULL`` (a recorded ``sent``
survives a power loss) and a busy timeout, and every read-modify-write step runs in one
short ``BEGIN IMMEDIATE`` transaction so several processes can share one file.

A ``postgresql://`` URL (driver: psycopg 3, ``pip install 'bulkmail[postgres]'``) puts the
same schema on PostgreSQL, where any number of workers on any number of hosts share a job:
they claim deliveries with ``SELECT ... FOR UPDATE SKIP LOCKED``, take the job row with
``SELECT ... FOR UPDATE`` whenever they change who runs it (register, reclaim, finish,
cancel), and share one rate-limit row, also locked with ``FOR UPDATE``. Locks are always
taken in the order jobs -> deliveries -> workers, so two transactions never wait on each
other in a circle. On SQLite ``FOR UPDATE`` compiles to nothing: ``BEGIN IMMEDIATE``
already serialises every writer.

The schema carries its version (``meta.schema_version``); opening an older store applies
the steps of ``MIGRATIONS`` in one transaction.

Times are stored as POSIX seconds (floats) and passed in by the caller (``now``), so the
logic that depends on them can be tested with a fixed clock.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from bulkmail.errors import JobNotFound, JobStateError, StoreError
from bulkmail.store.reads import Query, StoreReads
from bulkmail.store.records import (
    SCHEMA_VERSION,
    Claimed,
    ClaimResult,
    JobRecord,
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
    job_from_row,
    pick_dedupe,
    store_url,
    worker_from_row,
)

# a constant key for pg_advisory_xact_lock: workers starting at once create the schema once
_SCHEMA_LOCK = 0x62756C6B6D61696C  # "bulkmail"


metadata = sa.MetaData()


def _text(length: int) -> sa.types.TypeEngine[str]:
    """A string column: bounded as before on SQLite (where lengths are not enforced),
    unbounded on PostgreSQL (where they are), so an over-long address in a CSV is stored
    as a skipped delivery rather than failing the whole job."""
    return sa.String(length).with_variant(sa.Text(), "postgresql")


meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("token", sa.String(16), nullable=False),  # makes Message-IDs globally unique
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("provider", sa.String(16), nullable=False),
    sa.Column("provider_settings", sa.Text, nullable=False),  # JSON, never a secret
    sa.Column("account", _text(255), nullable=False),  # the rate-limit key
    sa.Column("sender", _text(500), nullable=False),
    sa.Column("subject", sa.Text, nullable=False),  # the subject template
    sa.Column("templates", sa.Text, nullable=False),  # JSON: text, html, attachments, names
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("rate", sa.Float, nullable=False),
    sa.Column("burst", sa.Integer, nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("backoff", sa.Float, nullable=False),
    sa.Column("dedupe_key", _text(255), nullable=True, index=True),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),  # why the job stopped (aborted / paused)
    sa.Column("log_path", sa.Text, nullable=True),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("host", _text(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("stopped_at", sa.Float, nullable=True),
    sa.Column("sent", sa.Integer, nullable=False, default=0),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("row", sa.Integer, nullable=False),
    sa.Column("email", _text(320), nullable=False),
    sa.Column("email_key", _text(320), nullable=False),  # lower-cased, for dedupe
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("fields", sa.Text, nullable=False),  # JSON
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text, nullable=True),  # or the skip reason
    sa.Column("next_attempt_at", sa.Float, nullable=False, default=0.0),
    sa.Column("provider_message_id", _text(255), nullable=True),
    sa.Column("message_id", _text(255), nullable=False),
    sa.Column("sent_at", sa.Float, nullable=True),
    sa.Column("worker_id", sa.String(32), nullable=True),
    sa.Column("in_doubt", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("job_id", "position", name="uq_deliveries_job_position"),
    # the claim query and the per-state counts of `status` read only this index
    sa.Index("ix_deliveries_claim", "job_id", "state", "next_attempt_at", "position"),
    # cron de-duplication: "was this address sent under that key?"
    sa.Index("ix_deliveries_email_state", "email_key", "state"),
    # `status` counts deliveries resent after a crash: a handful among millions
    sa.Index(
        "ix_deliveries_in_doubt",
        "job_id",
        sqlite_where=sa.text("in_doubt"),
        postgresql_where=sa.text("in_doubt"),
    ),
)

rate_buckets = sa.Table(
    "rate_buckets",
    metadata,
    sa.Column("key", _text(255), primary_key=True),
    sa.Column("tat", sa.Float, nullable=False),  # GCRA theoretical arrival time
)


# --------------------------------------------------------------------------- versions


def schema_version(conn: Connection) -> int | None:
    """The schema version recorded in a store: None for an empty database (a new store), 0
    for one holding bulkmail's tables but no recorded version."""
    tables = set(sa.inspect(conn).get_table_names())
    if "jobs" not in tables:
        return None
    if "meta" not in tables:
        return 0
    value = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    return 0 if value is None else int(value)


def _record_version(conn: Connection) -> None:
    """0 -> 1: the tables are those of version 1; only the version was never recorded (the
    ``meta`` table, when missing, is created after the steps)."""


# MIGRATIONS[n] upgrades a store from schema n to n + 1, inside the transaction that opens it.
# A change to the tables above adds a step here and bumps SCHEMA_VERSION; a step uses plain
# DDL that both SQLite and PostgreSQL understand (e.g. ALTER TABLE ... ADD COLUMN).
def _index_in_doubt(conn: Connection) -> None:
    """Schema 2: the partial index behind the in-doubt count of `status`."""
    ix = next(i for i in deliveries.indexes if i.name == "ix_deliveries_in_doubt")
    ix.create(conn, checkfirst=True)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {0: _record_version, 1: _index_in_doubt}


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
            deliveries.c.state == "pending",
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
        .where(deliveries.c.id == sa.bindparam("b_id"), deliveries.c.state == "pending")
        .values(
            state="sending",
            attempts=sa.bindparam("b_attempts"),
            worker_id=sa.bindparam("b_worker"),
        )
    )


@functools.cache
def _stmt_min_due() -> sa.Select[Any]:
    return sa.select(sa.func.min(deliveries.c.next_attempt_at)).where(
        deliveries.c.job_id == sa.bindparam("b_job"), deliveries.c.state == "pending"
    )


@functools.cache
def _stmt_outcome(keys: tuple[str, ...]) -> sa.Update:
    return (
        deliveries.update()
        .where(
            deliveries.c.id == sa.bindparam("o_id"),
            deliveries.c.state == "sending",
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


# --------------------------------------------------------------------------- opening


def _sqlite_path(url: sa.URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def _prepare_sqlite_file(path: Path) -> None:
    """Create the store file (and its folder) with owner-only permissions before SQLite
    does, so the deliveries (names, addresses) are never readable by other users. An
    existing file is checked, read-only, to be a bulkmail store (or empty) before the
    engine opens it: opening switches the file to WAL mode, which must never happen to
    someone else's database (``--store course.db`` typed for ``--db``)."""
    if path.exists():
        if path.is_dir():
            raise StoreError(f"{path}: is a directory, not a job store")
        _check_sqlite_store(path)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the job store: {exc.strerror}") from None


def _check_sqlite_store(path: Path) -> None:
    """Refuse an existing file that is not SQLite, or an SQLite database with tables that
    are not bulkmail's."""
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30.0)
        try:
            tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: not a bulkmail job store ({exc})") from None
    tables = [t for t in tables if not t.startswith("sqlite_")]
    if tables and "jobs" not in tables:
        raise StoreError(
            f"{path}: an SQLite database with other tables ({', '.join(tables[:4])}), not a "
            "bulkmail job store; give --store a new file (was it meant for --db sqlite:///...?)"
        )


def _set_wal(cursor: Any) -> None:
    """Put the store in WAL mode (persistent: a no-op once done). Switching a new file
    needs an exclusive lock, and SQLite answers "database is locked" at once, without its
    busy handler, when another process is opening the same new store: try again a while."""
    deadline = time.monotonic() + 30.0
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_engine(url: sa.URL) -> Engine:
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 30.0}, pool_size=8
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # let SQLAlchemy's begin event emit BEGIN itself (the pysqlite driver's own
        # transaction handling would defer it and cannot do BEGIN IMMEDIATE)
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        _set_wal(cursor)
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("bulkmail_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def _postgres_engine(url: sa.URL) -> Engine:
    shown = url.render_as_string(hide_password=True)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3, not SQLAlchemy's psycopg2
    if url.get_backend_name() != "postgresql":
        raise StoreError(
            f"--store {shown}: a job store is a SQLite file (a path or sqlite:///PATH) or a "
            "PostgreSQL database (postgresql://USER@HOST/DB)"
        )
    try:
        return sa.create_engine(
            url,
            pool_pre_ping=True,  # a worker outlives a server restart
            connect_args={"connect_timeout": 10, "application_name": "bulkmail"},
        )
    except ImportError as exc:
        raise StoreError(
            f"{shown}: a PostgreSQL store needs the psycopg driver "
            f"(pip install 'bulkmail[postgres]'): {exc}"
        ) from None
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"cannot open store {shown}: {exc}") from None


def open_store(location: str | os.PathLike[str] | None = None) -> Store:
    """Open (creating on first use, upgrading when older) the job store at ``location``."""
    try:
        url = sa.make_url(store_url(location))
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"--store: not a path or database URL: {exc}") from None
    path = _sqlite_path(url)
    if path is not None:
        _prepare_sqlite_file(path)
        store = Store(_sqlite_engine(url), str(path))
    else:
        store = Store(
            _postgres_engine(url),
            url.render_as_string(hide_password=True),
            url=url.render_as_string(hide_password=False),
        )
    store.create_schema()
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

            def query(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
                return [dict(row) for row in conn.execute(sa.text(sql), params).mappings()]

            yield query

    def create_schema(self) -> None:
        """Create the schema on first use, or bring an older one up to ``SCHEMA_VERSION``:
        every step of ``MIGRATIONS`` from the recorded version on, then the new version
        number, in ONE transaction (a failed step leaves the store as it was)."""
        try:
            with self._write() as conn:
                if self.server:
                    # several workers may open a new store at once: one creates it
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
                version = schema_version(conn)
                if version is None:  # a new store
                    metadata.create_all(conn)
                    conn.execute(
                        meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
                    )
                    return
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.location}: made by a newer bulkmail (schema {version}); "
                        "upgrade bulkmail to use it"
                    )
                if version == SCHEMA_VERSION:
                    return
                for step in range(version, SCHEMA_VERSION):
                    MIGRATIONS[step](conn)
                metadata.create_all(conn)  # tables new since then
                conn.execute(meta.delete().where(meta.c.key == "schema_version"))
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
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
                    state="queued",
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
                        "state": "skipped" if rcpt.skip_reason else "pending",
                        "attempts": 0,
                        "last_error": rcpt.skip_reason,
                        "next_attempt_at": 0.0,
                        "message_id": f"<bulkmail.{job_id}.{position}.{token}@{domain}>",
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
        keys = {row["email_key"] for row in batch if row["state"] == "pending"}
        if not keys:
            return
        query = (
            sa.select(deliveries.c.email_key, deliveries.c.job_id, deliveries.c.state)
            .join(jobs, jobs.c.id == deliveries.c.job_id)
            .where(
                deliveries.c.email_key.in_(keys),
                jobs.c.dedupe_key == dedupe_key,
                sa.or_(
                    deliveries.c.state == "sent",
                    sa.and_(
                        deliveries.c.state.in_(("pending", "sending")),
                        jobs.c.state != "cancelled",
                    ),
                ),
            )
        )
        taken = pick_dedupe((key, job, state) for key, job, state in conn.execute(query))
        for row in batch:
            if row["state"] == "pending" and row["email_key"] in taken:
                job, state = taken[row["email_key"]]
                row["state"] = "skipped"
                row["last_error"] = dedupe_reason(dedupe_key, job, state)

    def _job(self, conn: Connection, job_id: int, *, lock: bool = False) -> JobRecord:
        """The job; ``lock``: hold its row until the transaction ends (``FOR UPDATE`` on
        PostgreSQL; on SQLite the write transaction already excludes other writers)."""
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).mappings().first()
        if row is None:
            raise JobNotFound(job_id)
        return job_from_row(dict(row))

    def set_log_path(self, job_id: int, path: str) -> None:
        with self._write() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(log_path=path))

    # -- workers

    def _workers(
        self, conn: Connection, job_id: int, *, live_only: bool = False
    ) -> list[WorkerRecord]:
        query = sa.select(workers).where(workers.c.job_id == job_id)
        if live_only:
            query = query.where(workers.c.stopped_at.is_(None))
        rows = conn.execute(query.order_by(workers.c.started_at)).mappings()
        return [worker_from_row(dict(row)) for row in rows]

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
            if job.state in ("completed", "cancelled"):
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
            values: dict[str, Any] = {"state": "running", "finished_at": None, "error": None}
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
            deliveries.c.job_id == job_id, deliveries.c.state == "sending"
        )
        if live_ids:
            reclaim = reclaim.where(deliveries.c.worker_id.not_in(live_ids))
        reclaimed = conn.execute(
            reclaim.values(state="pending", in_doubt=True, next_attempt_at=0.0)
        ).rowcount
        dead = [w.id for w in current if w.id not in live_ids]
        if dead:
            conn.execute(workers.update().where(workers.c.id.in_(dead)).values(stopped_at=now))
        return int(reclaimed)

    def heartbeat(self, worker_id: str, *, now: float) -> str:
        """Renew a worker's heartbeat; return its job's state (so a cancel is noticed), or
        ``"stopped"`` when other workers took this one for gone (its heartbeat had gone
        stale) and took over its deliveries: it must stop before its next message."""
        with self._write() as conn:
            conn.execute(workers.update().where(workers.c.id == worker_id).values(heartbeat_at=now))
            row = conn.execute(
                sa.select(jobs.c.state, workers.c.stopped_at)
                .join(workers, workers.c.job_id == jobs.c.id)
                .where(workers.c.id == worker_id)
            ).first()
        if row is None:
            return "None"
        return "stopped" if row.stopped_at is not None else str(row.state)

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
            if state != "running":
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
            if job.state != "running":
                return Reclaimed(0, 0)
            current = self._workers(conn, job_id, live_only=True)
            live_workers = [w for w in current if is_alive(w)]
            reclaimed = self._take_over(conn, job_id, current, live_workers, now=now)
            held = self._sending_by_worker(conn, job_id)
        return Reclaimed(reclaimed, sum(n for w, n in held.items() if w != worker_id))

    def _sending_by_worker(self, conn: Connection, job_id: int) -> dict[str, int]:
        rows = conn.execute(
            sa.select(deliveries.c.worker_id, sa.func.count())
            .where(deliveries.c.job_id == job_id, deliveries.c.state == "sending")
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
            if job.state != "running":
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
                .where(
                    deliveries.c.job_id == job_id, deliveries.c.state.in_(("pending", "sending"))
                )
            ).scalar_one()
            if left == 0:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(state="completed", finished_at=now, error=None)
                )
                return "completed"
            if others == 0:
                # nothing claimable is left for us but work remains (e.g. abandoned): pause
                conn.execute(
                    jobs.update().where(jobs.c.id == job_id).values(state="paused", error=error)
                )
                return "paused"
            return "running"

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
            if state != "running":
                return Stop(str(state))
            if stopped_at is not None:
                # other workers took this one for gone (its heartbeat had gone stale) and
                # took over its deliveries: it must not claim more
                return Stop("stopped")
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
                values.update(state="sending", attempts=attempts, worker_id=worker_id)
                return Claimed(delivery_from_row(values))
            due = conn.execute(_stmt_min_due(), {"b_job": job_id}).scalar()
            if due is not None:
                return Wait(max(0.0, float(due) - now))
            return Stop("running", finished=True)

    def _taken_elsewhere(self, conn: Connection, d: dict[str, Any], dedupe_key: str) -> bool:
        """Whether another job under ``dedupe_key`` has sent, or is sending, this delivery's
        address (e.g. `retry` of an older job after a newer cron run): if so it becomes
        ``skipped`` with the reason, in the claim's transaction."""
        other = conn.execute(
            sa.select(deliveries.c.job_id, deliveries.c.state)
            .join(jobs, jobs.c.id == deliveries.c.job_id)
            .where(
                deliveries.c.email_key == d["email_key"],
                deliveries.c.job_id != d["job_id"],
                deliveries.c.state.in_(("sent", "sending")),
                jobs.c.dedupe_key == dedupe_key,
            )
            .order_by(deliveries.c.state.desc())  # 'sent' before 'sending'
            .limit(1)
        ).first()
        if other is None:
            return False
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == d["id"])
            .values(state="skipped", last_error=dedupe_reason(dedupe_key, other[0], other[1]))
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
        elif updated.rowcount and dict(outcome.values).get("state") == "pending":
            self._cancel_if_job_cancelled(conn, outcome.delivery_id)
        return bool(updated.rowcount)

    def _cancel_if_job_cancelled(self, conn: Connection, delivery_id: int) -> None:
        """A delivery handed back to ``pending`` (retry later, or released untried) after
        its job was cancelled is cancelled too, or it would stay pending forever."""
        cancelled_jobs = sa.select(jobs.c.id).where(jobs.c.state == "cancelled")
        conn.execute(
            deliveries.update()
            .where(
                deliveries.c.id == delivery_id,
                deliveries.c.state == "pending",
                deliveries.c.job_id.in_(cancelled_jobs),
            )
            .values(state="cancelled")
        )

    def record_sent(
        self, delivery_id: int, worker_id: str, *, provider_message_id: str | None, now: float
    ) -> bool:
        return self.record(Outcome.sent(delivery_id, provider_message_id, now), worker_id)

    def record_failed(self, delivery_id: int, worker_id: str, *, error: str) -> bool:
        return self.record(Outcome.failed(delivery_id, error), worker_id)

    def record_retry(
        self,
        delivery_id: int,
        worker_id: str,
        *,
        error: str,
        next_attempt_at: float,
        in_doubt: bool = False,
    ) -> bool:
        """Back to pending until ``next_attempt_at``. ``in_doubt``: the server may have
        accepted the message (connection lost after the data was sent)."""
        return self.record(Outcome.retry(delivery_id, error, next_attempt_at, in_doubt), worker_id)

    def release(self, delivery_id: int, worker_id: str) -> bool:
        """Give a claimed delivery back untried (the job stopped before it was sent)."""
        with self._write() as conn:
            updated = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.id == delivery_id,
                    deliveries.c.state == "sending",
                    deliveries.c.worker_id == worker_id,
                )
                .values(state="pending", attempts=deliveries.c.attempts - 1)
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
            if job.state in ("completed", "cancelled"):
                raise JobStateError(f"job {job_id} is already {job.state}")
            current = self._workers(conn, job_id, live_only=True)
            live = [w.id for w in current if alive is None or alive(w)]
            gone_sending = sa.and_(deliveries.c.state == "sending")
            if live:
                gone_sending = sa.and_(gone_sending, deliveries.c.worker_id.not_in(live))
            count = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.job_id == job_id,
                    sa.or_(deliveries.c.state == "pending", gone_sending),
                )
                .values(state="cancelled")
            ).rowcount
            conn.execute(
                jobs.update().where(jobs.c.id == job_id).values(state="cancelled", finished_at=now)
            )
        return int(count)

    def retry_failed(self, job_id: int) -> int:
        """Put a job's failed deliveries back to pending with fresh attempts."""
        with self._write() as conn:
            job = self._job(conn, job_id, lock=True)
            if job.state == "cancelled":
                raise JobStateError(f"job {job_id} is cancelled; start a new job instead")
            count = conn.execute(
                deliveries.update()
                .where(deliveries.c.job_id == job_id, deliveries.c.state == "failed")
                .values(state="pending", attempts=0, next_attempt_at=0.0)
            ).rowcount
            if count and job.state == "completed":
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(state="queued", finished_at=None)
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
