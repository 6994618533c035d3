"""Opening a job store's engine: a SQLite file (checked, created private and whole, WAL)
or a PostgreSQL server (psycopg 3).

On SQLite an existing file is checked read-only to be a bulkmail store
(:func:`bulkmail.store.files.inspect_sqlite`) before it is switched to WAL mode; a new store
is made only when asked (``create``), whole: its schema is written into a private temporary
file (mode 0600) beside it, which is then linked into place. So a store's path never holds a
half-made store, and a 0-byte file there is always a truncated store, refused rather than
made a new one. Each connection runs with ``synchronous=FULL`` (a recorded ``sent`` survives
a power loss), a busy timeout and foreign keys. A write transaction (execution option
``bulkmail_write``) begins with ``BEGIN IMMEDIATE``, so several processes can share one file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from bulkmail.errors import StoreError
from bulkmail.store.files import inspect_sqlite
from bulkmail.store.records import store_url

__all__ = ["POSTGRES_CONNECT_ARGS", "Opened", "open_engine"]


@dataclass(frozen=True)
class Opened:
    """An engine on a job store, with how to name the store."""

    engine: Engine
    location: str  # for messages: never shows a password
    url: str  # to hand to a worker process: may hold a password
    created: bool = False  # a new SQLite store was made at its path just now


def open_engine(location: str | os.PathLike[str] | None, *, create: bool = True) -> Opened:
    """The engine for the store at ``location`` (a path or a URL; None: the default file).
    A SQLite file is checked first; when there is none, a new store is made (``create``)
    or ``NoJobStore`` raised (nothing is created, not even the folder). Nothing is
    connected yet on an existing store."""
    try:
        url = sa.make_url(store_url(location))
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"--store: not a path or database URL: {exc}") from None
    path = _sqlite_path(url)
    if path is not None:
        created = False
        if inspect_sqlite(path, create=create) is None:
            created = _create_sqlite_store(path)
            if not created:  # another process made it meanwhile: check theirs
                inspect_sqlite(path, create=False)
        return Opened(_sqlite_engine(url), str(path), str(path), created)
    shown = url.render_as_string(hide_password=True)
    return Opened(_postgres_engine(url), shown, url.render_as_string(hide_password=False))


def _sqlite_path(url: sa.URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def _create_sqlite_store(path: Path) -> bool:
    """Make a new store at ``path`` whole, with owner-only permissions (the deliveries hold
    names and addresses): the folder (0700) when missing, the schema in a temporary file
    (0600) beside it, then a hard link to ``path``, which never replaces a file another
    process put there first (False then). WAL mode is switched on when the store is opened."""
    from bulkmail.store.schema import create_schema

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the job store: {exc.strerror}") from None
    try:
        engine = _sqlite_engine(sa.make_url(f"sqlite:///{tmp}"), wal=False)
        try:
            with engine.connect() as conn:
                conn.execution_options(bulkmail_write=True)
                with conn.begin():
                    create_schema(conn, server=False, location=str(path))
        finally:
            engine.dispose()
        _fsync(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: a rename, never over a file
            if path.exists():
                return False
            os.replace(tmp, path)
        with contextlib.suppress(OSError):  # not every file system syncs a folder
            _fsync(path.parent)
        return True
    except (OSError, sa.exc.DBAPIError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc.orig
        raise StoreError(f"{path}: cannot create the job store: {reason}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _sqlite_engine(url: sa.URL, *, wal: bool = True) -> Engine:
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
        if wal:
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
