"""A read-only view of a SQLite job store through the standard library's sqlite3.

``status``, ``recent`` and ``report`` only read; on the embedded SQLite store they use this
reader and never import SQLAlchemy, which is most of their start-up time. The queries are
the shared ones of :mod:`bulkmail.store.reads`. Anything this reader cannot serve (a
PostgreSQL URL, a store that needs a migration) is opened as a full store instead; neither
ever creates a store.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulkmail.errors import StoreError
from bulkmail.store.files import NoJobStore, connect_ro, inspect_sqlite
from bulkmail.store.reads import Query, StoreReads
from bulkmail.store.records import SCHEMA_VERSION, store_url

if TYPE_CHECKING:
    from bulkmail.store.contract import StoreReader

SQLITE_PREFIX = "sqlite:///"


class LiteReader(StoreReads):
    """Reads of one SQLite store file, opened read-only for each transaction (a store in a
    read-only folder too: ``files.connect_ro``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    @contextmanager
    def _reading(self) -> Iterator[Query]:
        try:
            conn = connect_ro(self.path)
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
    """There is no store yet (and nothing is created): no jobs at all. What a command
    about to create the store reads, e.g. the dedupe history of `send-reminders --dry-run
    --new-store`."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.location = str(location)

    @contextmanager
    def _reading(self) -> Iterator[Query]:
        def query(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            return []

        yield query


def open_reader(
    location: str | os.PathLike[str] | None = None, *, missing_ok: bool = True
) -> StoreReader:
    """What ``status``/``recent``/``report`` read from: the light reader for an existing
    SQLite store at the current schema, else the full store (PostgreSQL, or a store to be
    migrated). Where there is no store, ``NoStore`` when ``missing_ok``, else ``NoJobStore``;
    nothing is created either way. A 0-byte file, or one that is not a bulkmail store, is
    refused (``files.inspect_sqlite``)."""
    url = store_url(location)
    if url.startswith(SQLITE_PREFIX) and "?" not in url:
        path = Path(url[len(SQLITE_PREFIX) :])
        version = inspect_sqlite(path, create=missing_ok)
        if version is None:
            return NoStore(path)
        if version == SCHEMA_VERSION:
            return LiteReader(path)
    from bulkmail.store.sql import open_store

    try:
        return open_store(location, create=False)
    except NoJobStore as exc:
        if missing_ok:
            return NoStore(exc.location)
        raise
