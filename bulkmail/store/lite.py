"""A read-only view of a SQLite job store through the standard library's sqlite3.

``status``, ``recent`` and ``report`` only read; on the embedded SQLite store they use this
reader and never import SQLAlchemy, which is most of their start-up time. The queries are
the shared ones of :mod:`bulkmail.store.reads`. Anything this reader cannot serve (a
PostgreSQL URL, a store that needs a migration) is opened as a full store instead.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulkmail.errors import StoreError
from bulkmail.store.reads import Query, StoreReads
from bulkmail.store.records import SCHEMA_VERSION, store_url

if TYPE_CHECKING:
    from bulkmail.store.contract import StoreReader

SQLITE_PREFIX = "sqlite:///"


class LiteReader(StoreReads):
    """Reads of one SQLite store file, opened read-only for each transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    @contextmanager
    def _reading(self) -> Iterator[Query]:
        try:
            conn = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=30.0)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the job store: {exc}") from None
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("BEGIN")  # one snapshot for all the queries of a view

            def query(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
                return [dict(row) for row in conn.execute(sql, params)]

            yield query
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a bulkmail job store ({exc})") from None
        finally:
            conn.close()


class NoStore(StoreReads):
    """The store file does not exist yet: no jobs at all (and nothing is created)."""

    def __init__(self, path: Path) -> None:
        self.location = str(path)

    @contextmanager
    def _reading(self) -> Iterator[Query]:
        def query(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            return []

        yield query


def _schema_version(path: Path) -> int | None:
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30.0)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    return int(row[0]) if row else None


def open_reader(location: str | os.PathLike[str] | None = None) -> StoreReader:
    """What ``status``/``recent``/``report`` read from: the light reader for an existing
    SQLite store at the current schema, no store at all for a missing file, else the full
    store (PostgreSQL, or a store to be migrated or diagnosed)."""
    url = store_url(location)
    if url.startswith(SQLITE_PREFIX) and "?" not in url:
        path = Path(url[len(SQLITE_PREFIX) :])
        if not path.exists():
            return NoStore(path)
        if path.is_file() and _schema_version(path) == SCHEMA_VERSION:
            return LiteReader(path)
    from bulkmail.store.sql import open_store

    return open_store(location)
