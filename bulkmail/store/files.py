"""What is at a SQLite store's path, told before anything opens it for writing: nothing,
a bulkmail store (and its schema version), or something that must not become one.

A store is never created by accident: only ``send-reminders`` creates one, and never over
an existing file. A 0-byte file is a truncated store (or a mistake), an SQLite database
without tables is not one bulkmail made (a new store appears at its path whole, see
:mod:`bulkmail.store.engine`), and a database with other tables is someone else's: all
three are refused, not silently made a new, empty store whose dedupe history would be gone.

Standard library only (``sqlite3``): the light reader of :mod:`bulkmail.store.readonly` uses it
without importing SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bulkmail.errors import StoreError

__all__ = ["NoJobStore", "connect_ro", "inspect_sqlite"]

_HINT = "(a mistyped --store or BULKMAIL_STORE?)"


class NoJobStore(StoreError):
    """There is no job store at ``location`` (nothing was created there)."""

    def __init__(self, location: str, detail: str = "", then: str = "") -> None:
        super().__init__(f"no job store at {location}{detail} {_HINT}{then}")
        self.location = location


def connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection to the database at ``path``, opened now.

    ``mode=ro`` still needs the WAL index (``-shm``), which SQLite creates next to the file
    when it is absent: in a read-only folder (a backup, a read-only mount) that fails. With
    no ``-wal`` file there, nobody is writing (a writer would have had to create it) and
    every commit is in the file itself, so it is then read as ``immutable=1``, which needs
    no lock and no ``-shm``."""
    uri = path.as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if Path(f"{path}-wal").exists():
            raise
    conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=30.0)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def inspect_sqlite(path: Path, *, create: bool) -> int | None:
    """The schema version of the bulkmail store at ``path`` (0: bulkmail's tables without a
    recorded version), read-only; None when there is no file and ``create`` says the caller
    may make one. Everything else is refused with an error naming the path: no file (when
    not ``create``: ``NoJobStore``), a folder, a 0-byte file, an SQLite database without
    tables, one with other tables, a file that is not SQLite."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if create:
            return None
        raise NoJobStore(str(path)) from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the job store: {exc.strerror}") from None
    if path.is_dir():
        raise StoreError(f"{path}: is a directory, not a job store")
    if size == 0:
        if create:
            raise StoreError(
                f"{path} is empty (0 bytes): not a job store; remove it to start a new store"
            )
        raise NoJobStore(str(path), ": the file is empty (0 bytes)")
    try:
        conn = connect_ro(path)
        try:
            tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))
            tables = [t for t in tables if not t.startswith("sqlite_")]
            if "jobs" not in tables:
                version = None
            elif "meta" not in tables:
                version = 0
            else:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else 0
        finally:
            conn.close()
    except (sqlite3.Error, ValueError) as exc:
        raise StoreError(f"{path}: not a bulkmail job store ({exc})") from None
    if tables and version is None:
        raise StoreError(
            f"{path}: an SQLite database with other tables ({', '.join(tables[:4])}), not a "
            "bulkmail job store; give --store a new file (was it meant for --db sqlite:///...?)"
        )
    if version is None:  # an SQLite database without a single table
        if create:
            raise StoreError(
                f"{path} is an SQLite database without bulkmail's tables: not a job store; "
                "remove it to start a new store"
            )
        raise NoJobStore(str(path), ": an SQLite database without bulkmail's tables")
    return version
