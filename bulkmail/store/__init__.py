"""The job store: every job, every delivery, every worker and the shared rate-limit rows.

- :mod:`bulkmail.store.records`: the plain records and states (no SQLAlchemy).
- :mod:`bulkmail.store.contract`: the store's contract, ``JobStore`` and its read subset
  ``StoreReader``, as typed Protocols (no SQLAlchemy).
- :mod:`bulkmail.store.reads`: the read queries and the SQL of the store's shared knowledge
  (job and worker reads, the dedupe predicate), written once for every backend.
- :mod:`bulkmail.store.schema`: the tables, the schema version and its migrations.
- :mod:`bulkmail.store.files`: what is at a SQLite store's path, told read-only (no store,
  a 0-byte file, someone else's database...): a store is never created by accident.
- :mod:`bulkmail.store.engine`: opening a SQLite file (checks, WAL) or a PostgreSQL server.
- :mod:`bulkmail.store.sql`: the store itself on SQLAlchemy 2 Core (SQLite or PostgreSQL):
  all writes, the send loop's claims and outcomes, workers, the rate-limit rows.
- :mod:`bulkmail.store.aftersend`: the store's operations on events, the suppression list,
  processed bounce messages and API tokens (a mixin of ``sql.Store``).
- :mod:`bulkmail.store.readonly`: a read-only SQLite reader for ``status``, ``recent`` and
  ``report``, so those commands start without importing SQLAlchemy.

The records and the contract are imported from here directly; ``Store``, ``open_store`` and
the tables are loaded on first use, so importing a record does not pay for SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bulkmail.store.contract import JobStore, StoreReader
from bulkmail.store.records import *  # noqa: F403
from bulkmail.store.records import __all__ as _records

if TYPE_CHECKING:
    from bulkmail.store.readonly import open_reader as open_reader
    from bulkmail.store.schema import MIGRATIONS as MIGRATIONS
    from bulkmail.store.schema import deliveries as deliveries
    from bulkmail.store.schema import jobs as jobs
    from bulkmail.store.schema import meta as meta
    from bulkmail.store.schema import metadata as metadata
    from bulkmail.store.schema import rate_buckets as rate_buckets
    from bulkmail.store.schema import workers as workers
    from bulkmail.store.sql import Store as Store
    from bulkmail.store.sql import open_store as open_store

_LAZY = {
    "MIGRATIONS": "schema",
    "Store": "sql",
    "deliveries": "schema",
    "jobs": "schema",
    "meta": "schema",
    "metadata": "schema",
    "open_store": "sql",
    "rate_buckets": "schema",
    "workers": "schema",
    "open_reader": "readonly",
}

__all__ = ["JobStore", "StoreReader", *_records, *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bulkmail.store' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"bulkmail.store.{module}"), name)
