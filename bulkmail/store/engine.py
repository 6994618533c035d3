"""Opening a job store's engine: a SQLite file (checked, created private, WAL) or a
PostgreSQL server (psycopg 3).

On SQLite the file is created with mode 0600 before SQLite opens it, an existing file is
checked read-only to be a bulkmail store (or empty) before it is switched to WAL mode, and
each connection runs with ``synchronous=FULL`` (a recorded ``sent`` survives a power loss),
a busy timeout and foreign keys. A write transaction (execution option ``bulkmail_write``)
begins with ``BEGIN IMMEDIATE``, so several processes can share one file.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from bulkmail.errors import StoreError
from bulkmail.store.records import store_url

__all__ = ["POSTGRES_CONNECT_ARGS", "Opened", "open_engine"]


@dataclass(frozen=True)
class Opened:
    """An engine on a job store, with how to name the store."""

    engine: Engine
    location: str  # for messages: never shows a password
    url: str  # to hand to a worker process: may hold a password


def open_engine(location: str | os.PathLike[str] | None) -> Opened:
    """The engine for the store at ``location`` (a path or a URL; None: the default file).
    A SQLite file is checked, or created private, first; nothing is connected yet."""
    try:
        url = sa.make_url(store_url(location))
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"--store: not a path or database URL: {exc}") from None
    path = _sqlite_path(url)
    if path is not None:
        _prepare_sqlite_file(path)
        return Opened(_sqlite_engine(url), str(path), str(path))
    shown = url.render_as_string(hide_password=True)
    return Opened(_postgres_engine(url), shown, url.render_as_string(hide_password=False))


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


# How a PostgreSQL connection notices that the server or the network is gone, so a worker
# never hangs on a dead connection (it gets an error and retries: manager's store retry):
# connecting gives up after connect_timeout; an idle connection is probed by TCP keepalives
# (first after keepalives_idle seconds, then every keepalives_interval, dropped after
# keepalives_count unanswered); data left unacknowledged for tcp_user_timeout milliseconds
# drops it too (a server cut off mid-statement). libpq ignores the last on systems
# without TCP_USER_TIMEOUT.
POSTGRES_CONNECT_ARGS: dict[str, int | str] = {
    "application_name": "bulkmail",
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,
}


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
            connect_args=dict(POSTGRES_CONNECT_ARGS),
        )
    except ImportError as exc:
        raise StoreError(
            f"{shown}: a PostgreSQL store needs the psycopg driver "
            f"(pip install 'bulkmail[postgres]'): {exc}"
        ) from None
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"cannot open store {shown}: {exc}") from None
