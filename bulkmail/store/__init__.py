"""The job store: every job, every delivery, every worker and the shared rate-limit rows.

- :mod:`bulkmail.store.records`: the plain records (no SQLAlchemy).
- :mod:`bulkmail.store.reads`: the read queries, written once for every backend.
- :mod:`bulkmail.store.sql`: the store itself on SQLAlchemy 2 Core (SQLite or PostgreSQL):
  all writes, the send loop's claims and outcomes, workers, the rate-limit rows.
- :mod:`bulkmail.store.lite`: a read-only SQLite reader for ``status``, ``recent`` and
  ``report``, so those commands start without importing SQLAlchemy.

The records are imported from here directly; ``Store``, ``open_store`` and the tables are
loaded on first use, so importing a record does not pay for SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bulkmail.store.records import *  # noqa: F403
from bulkmail.store.records import __all__ as _records

if TYPE_CHECKING:
    from bulkmail.store.lite import open_reader as open_reader
    from bulkmail.store.sql import MIGRATIONS as MIGRATIONS
    from bulkmail.store.sql import Store as Store
    from bulkmail.store.sql import deliveries as deliveries
    from bulkmail.store.sql import jobs as jobs
    from bulkmail.store.sql import meta as meta
    from bulkmail.store.sql import metadata as metadata
    from bulkmail.store.sql import open_store as open_store
    from bulkmail.store.sql import rate_buckets as rate_buckets
    from bulkmail.store.sql import workers as workers

_LAZY = {
    "MIGRATIONS": "sql",
    "Store": "sql",
    "deliveries": "sql",
    "jobs": "sql",
    "meta": "sql",
    "metadata": "sql",
    "open_store": "sql",
    "rate_buckets": "sql",
    "workers": "sql",
    "open_reader": "lite",
}

__all__ = [*_records, *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bulkmail.store' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"bulkmail.store.{module}"), name)
