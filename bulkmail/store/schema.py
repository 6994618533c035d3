"""The job store's schema: the tables, the schema version and its migrations.

The schema carries its version (``meta.schema_version``, ``records.SCHEMA_VERSION``);
opening an older store applies the steps of ``MIGRATIONS`` in the transaction that opens it.
The state columns hold the values of ``records.JobState`` and ``records.DeliveryState``.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bulkmail.errors import StoreError
from bulkmail.store.files import NoJobStore
from bulkmail.store.records import SCHEMA_VERSION

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "api_tokens",
    "create_schema",
    "deliveries",
    "events",
    "jobs",
    "meta",
    "metadata",
    "processed",
    "rate_buckets",
    "schema_version",
    "sends",
    "suppressions",
    "workers",
]

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
    # schema 4: the calendar (JSON list of --window texts, IANA zone, POSIX seconds), the
    # account's caps in force at creation, --recheck, and why/until when a worker waits
    sa.Column("windows", sa.Text, nullable=True),
    sa.Column("tz", sa.String(64), nullable=True),
    sa.Column("not_before", sa.Float, nullable=True),
    sa.Column("not_after", sa.Float, nullable=True),
    sa.Column("per_hour", sa.Integer, nullable=True),
    sa.Column("per_day", sa.Integer, nullable=True),
    sa.Column("recheck_url", sa.Text, nullable=True),  # never holds a password
    sa.Column("recheck_query", sa.Text, nullable=True),
    sa.Column("waiting_for", sa.Text, nullable=True),
    sa.Column("waiting_until", sa.Float, nullable=True),
    # who created the job: an API token's name (the dashboard, the HTTP API); None: the CLI
    sa.Column("created_by", _text(255), nullable=True),
    sa.Column("name", sa.Text, nullable=True),  # the job's label (--name)
    # schema 9: --include-suppressed, which the claim honours too (false: the list is checked
    # at creation and again at each claim)
    sa.Column("include_suppressed", sa.Boolean, nullable=False, server_default=sa.false()),
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
    # machine + boot + pid namespace (liveness.this_host_id): a pid is judged only on its host
    sa.Column("host_id", sa.String(64), nullable=True),
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
    # a webhook event or a bounce may name its message by the provider's id alone
    sa.Index("ix_deliveries_provider_message_id", "provider_message_id"),
)

# What happened after the send (delivery events, bounces), one row per event; ``event_id``
# (the provider's, or derived from the bounce message) makes a second delivery of the same
# event a no-op. An event no delivery of the store matches keeps NULL job and delivery.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", _text(255), nullable=False, unique=True),
    sa.Column("job_id", sa.Integer, nullable=True),
    sa.Column("delivery_id", sa.Integer, nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),  # a records.EventKind value
    sa.Column("email", _text(320), nullable=False),
    sa.Column("at", sa.Float, nullable=False),  # when it happened (the provider's time)
    sa.Column("recorded_at", sa.Float, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # mailtrap | dsn
    sa.Column("detail", sa.Text, nullable=True),  # the server's words (bounces)
    # the event counts of `status`, and `status --bounced`, read only this index
    sa.Index("ix_events_job_kind", "job_id", "kind", "delivery_id"),
    sa.Index("ix_events_delivery", "delivery_id"),
)

# Addresses later jobs skip (hard bounces, spam complaints, unsubscribes, added by hand)
suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("email_key", _text(320), primary_key=True),  # lower-cased
    sa.Column("email", _text(320), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),  # bounced | complained | ...
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("job_id", sa.Integer, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
)

# Bounce messages already read (`bulkmail bounces`), so a second run adds nothing
processed = sa.Table(
    "processed",
    metadata,
    sa.Column("key", _text(500), primary_key=True),  # "maildir:NAME", "msgid:<...>"
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("note", sa.Text, nullable=True),
)

rate_buckets = sa.Table(
    "rate_buckets",
    metadata,
    sa.Column("key", _text(255), primary_key=True),
    sa.Column("tat", sa.Float, nullable=False),  # GCRA theoretical arrival time
    # schema 4, throttling: no send on the account before this (a Retry-After, account-wide)
    # and how far the server slowed it (1.0: not at all; halved by each throttling reply)
    sa.Column("not_before", sa.Float, nullable=True),
    sa.Column("factor", sa.Float, nullable=True),
)

# schema 4: one row per message claimed on an account (sent or in flight), written in the
# claim's transaction and pruned after a day: the hourly and daily caps count these. Schema 8:
# which delivery and worker the claim was, so a claim given back untried (released, fenced,
# refused as too fast) is taken out again and a sent one is re-timed to when it went out
sends = sa.Table(
    "sends",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("account", _text(255), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("delivery_id", sa.Integer, nullable=True),  # NULL: logged before schema 8
    sa.Column("worker_id", sa.String(32), nullable=True),
    sa.Index("ix_sends_account_at", "account", "at"),
    sa.Index("ix_sends_delivery", "delivery_id"),
)


# the HTTP API's and the dashboard's tokens: only a hash of each is kept (bulkmail.web.auth)
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # sha256, hex
    sa.Column("role", sa.String(16), nullable=False),  # viewer | sender
    sa.Column("created_at", sa.Float, nullable=False),
)


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


def _worker_host_id(conn: Connection) -> None:
    """Schema 3: ``workers.host_id``; workers registered before it have none (and are
    judged by hostname, as before)."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("workers")}
    if "host_id" not in columns:
        conn.execute(sa.text("ALTER TABLE workers ADD COLUMN host_id VARCHAR(64)"))


_TIMING_COLUMNS = {
    "jobs": (
        ("windows", "TEXT"),
        ("tz", "VARCHAR(64)"),
        ("not_before", "FLOAT"),
        ("not_after", "FLOAT"),
        ("per_hour", "INTEGER"),
        ("per_day", "INTEGER"),
        ("recheck_url", "TEXT"),
        ("recheck_query", "TEXT"),
        ("waiting_for", "TEXT"),
        ("waiting_until", "FLOAT"),
    ),
    "rate_buckets": (("not_before", "FLOAT"), ("factor", "FLOAT")),
}


def _timing(conn: Connection) -> None:
    """Schema 4 (issue 12): the job's calendar, caps, --recheck and waiting columns, the
    throttling columns of ``rate_buckets``, and the ``sends`` log with its index (created
    with the tables new since then, after the steps)."""
    for table, columns in _TIMING_COLUMNS.items():
        present = {c["name"] for c in sa.inspect(conn).get_columns(table)}
        for name, kind in columns:
            if name not in present:
                conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {name} {kind}"))


def _events_and_suppressions(conn: Connection) -> None:
    """Schema 5: the ``events``, ``suppressions`` and ``processed`` tables, and the index on
    ``deliveries.provider_message_id`` an event without a delivery id is matched by."""
    for table in (events, suppressions, processed):
        table.create(conn, checkfirst=True)
    ix = next(i for i in deliveries.indexes if i.name == "ix_deliveries_provider_message_id")
    ix.create(conn, checkfirst=True)


def _api_tokens(conn: Connection) -> None:
    """Schema 6: ``jobs.created_by`` and the ``api_tokens`` table (self-contained: the
    table is created here, not left to ``create_all``, so a renumbered step still works)."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    if "created_by" not in columns:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN created_by TEXT"))
    api_tokens.create(conn, checkfirst=True)


def _job_name(conn: Connection) -> None:
    """Schema 7: ``jobs.name``, the job's label (--name); older jobs have none (NULL) and
    are shown by their subject, as before."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    if "name" not in columns:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN name TEXT"))


def _sends_claims(conn: Connection) -> None:
    """Schema 8: ``sends.delivery_id`` and ``sends.worker_id`` with an index on the first
    (self-contained: a store older than schema 4 gets the whole table here). Rows logged
    before have neither: they count until they leave the day, as before."""
    if "sends" not in sa.inspect(conn).get_table_names():
        sends.create(conn)
        return
    columns = {c["name"] for c in sa.inspect(conn).get_columns("sends")}
    if "delivery_id" not in columns:
        conn.execute(sa.text("ALTER TABLE sends ADD COLUMN delivery_id INTEGER"))
    if "worker_id" not in columns:
        conn.execute(sa.text("ALTER TABLE sends ADD COLUMN worker_id VARCHAR(32)"))
    ix = next(i for i in sends.indexes if i.name == "ix_sends_delivery")
    ix.create(conn, checkfirst=True)


def _include_suppressed(conn: Connection) -> None:
    """Schema 9: ``jobs.include_suppressed``, so the claim skips an address suppressed after
    the job was created unless the job was made with --include-suppressed. Jobs made before
    did not record it: false, the safe side (their addresses were checked at creation)."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    if "include_suppressed" not in columns:
        conn.execute(
            sa.text("ALTER TABLE jobs ADD COLUMN include_suppressed BOOLEAN NOT NULL DEFAULT false")
        )


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    0: _record_version,
    1: _index_in_doubt,
    2: _worker_host_id,
    3: _timing,
    4: _events_and_suppressions,
    5: _api_tokens,
    6: _job_name,
    7: _sends_claims,
    8: _include_suppressed,
}


def create_schema(conn: Connection, *, server: bool, location: str, create: bool = True) -> bool:
    """Create the schema in a new store (only when ``create``: else ``NoJobStore``), or
    bring an older one up to ``SCHEMA_VERSION``: every step of ``MIGRATIONS`` from the
    recorded version on, then the new version number. Runs in the caller's write
    transaction, so a failed step leaves the store as it was. True when it created one."""
    if server:
        # several workers may open a new store at once: one creates it
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
    version = schema_version(conn)
    if version is None and not create:
        raise NoJobStore(location, ": no bulkmail tables there")
    if version is None:  # a new store
        metadata.create_all(conn)
        conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
        return True
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{location}: made by a newer bulkmail (schema {version}); upgrade bulkmail to use it"
        )
    if version == SCHEMA_VERSION:
        return False
    for step in range(version, SCHEMA_VERSION):
        MIGRATIONS[step](conn)
    metadata.create_all(conn)  # tables new since then
    conn.execute(meta.delete().where(meta.c.key == "schema_version"))
    conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
    return False
