"""The job store's plain records, shared by every backend and by the views.

Nothing here imports SQLAlchemy: ``bulkmail status`` and ``bulkmail recent`` read a SQLite
store through :mod:`bulkmail.store.readonly` without paying for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "ROLES",
    "SCHEMA_VERSION",
    "WORKER_STOPPED",
    "BatchClaimResult",
    "ClaimResult",
    "Claimed",
    "ClaimedBatch",
    "Counts",
    "DeliveryRecord",
    "DeliveryState",
    "EventKind",
    "EventSummary",
    "EventView",
    "HistoryRecord",
    "JobRecord",
    "JobState",
    "JobView",
    "NewDelivery",
    "NewEvent",
    "NewJob",
    "Outcome",
    "Reclaimed",
    "Registration",
    "Stop",
    "Suppression",
    "TokenRecord",
    "Wait",
    "WorkerAlive",
    "WorkerRecord",
    "creating_error",
    "creating_refusal",
    "dedupe_reason",
    "default_store_path",
    "delivery_from_row",
    "job_from_row",
    "message_id",
    "parse_message_id",
    "pick_dedupe",
    "store_url",
    "suppression_reason",
    "worker_from_row",
]

SCHEMA_VERSION = 9  # 2: the partial index on deliveries.in_doubt; 3: workers.host_id;
# 4: the job's calendar, caps and waiting columns, the per-account ``sends`` log, throttling
# columns on ``rate_buckets``; 5: events, suppressions, processed (delivery events, bounces,
# the suppression list); 6: jobs.created_by and the api_tokens table; 7: jobs.name;
# 8: ``sends.delivery_id``/``worker_id`` (a claim given back untried leaves the caps' log);
# 9: ``jobs.include_suppressed`` (the claim skips an address suppressed since creation)


class JobState(StrEnum):
    """A job's state as stored (the strings are the stored values: no migration).

    ``creating -> queued -> running -> completed``; a job created with ``--not-before`` in
    the future is ``creating -> scheduled -> running`` (``bulkmail run-due`` starts it).
    A job is ``creating`` while its deliveries are written in batches (no worker runs it;
    one left ``creating`` was interrupted: it is cancelled, never run);
    ``running -> paused`` (Ctrl-C, too many transient failures), ``running -> aborted``
    (fatal provider error), ``* -> cancelled``. ``paused``
    and ``aborted`` jobs resume. ``STALLED`` is never stored: it is how a ``running`` job
    whose workers are all gone is shown (``documents.effective_state``).
    """

    CREATING = "creating"
    SCHEDULED = "scheduled"  # created for later (--not-before): `bulkmail run-due` starts it
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    STALLED = "stalled"  # shown, never stored


class DeliveryState(StrEnum):
    """A delivery's state as stored: ``pending -> sending -> sent | failed``, ``skipped``,
    ``cancelled``, ``expired`` (still pending at the job's ``--not-after``: never sent).
    ``sending`` is committed before the provider is called."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class EventKind(StrEnum):
    """What happened to a message after the send, as stored (Mailtrap's webhook event names,
    which the RFC 3464 bounces reuse: a 5.x.x status is a ``bounce``, a 4.x.x one a ``soft
    bounce``)."""

    DELIVERY = "delivery"
    SOFT_BOUNCE = "soft bounce"
    BOUNCE = "bounce"
    REJECT = "reject"
    SPAM = "spam"
    UNSUBSCRIBE = "unsubscribe"
    SUSPENSION = "suspension"
    OPEN = "open"
    CLICK = "click"


# the events that put the address on the suppression list, and how the list words each
SUPPRESSING = {
    EventKind.BOUNCE: "bounced",
    EventKind.SPAM: "complained",
    EventKind.UNSUBSCRIBE: "unsubscribed",
}
# the events `status` counts a delivery as bounced for (not delivered, for good)
HARD_BOUNCES = (EventKind.BOUNCE, EventKind.REJECT)


# What a worker's heartbeat and claims answer, instead of the job's state, once other
# workers took it for gone (its heartbeat had gone stale): it must stop. Never stored.
WORKER_STOPPED = "stopped"


@dataclass(frozen=True)
class NewJob:
    """What the caller knows about a job before it exists (and what a job records of it)."""

    provider: str
    provider_settings: Mapping[str, Any]  # JSON, never a secret
    account: str  # the rate-limit key
    sender: str
    subject: str  # the subject template
    templates: Mapping[str, Any]  # JSON: text, html, attachments, their names
    source: str
    rate: float
    burst: int
    concurrency: int
    max_retries: int
    backoff: float
    dedupe_key: str | None
    # the calendar (bulkmail.schedule): windows as given, the zone's IANA name, the span
    windows: tuple[str, ...] = ()
    tz: str | None = None
    not_before: float | None = None
    not_after: float | None = None
    # the account's caps in force when the job was created (flag, environment or config)
    per_hour: int | None = None
    per_day: int | None = None
    # --recheck: the database URL without its password, and the query
    recheck_url: str | None = None
    recheck_query: str | None = None
    created_by: str | None = None  # an API token's name; None: the command line
    # the job's label (--name; default: the source and the subject); None for a job made
    # before schema 4
    name: str | None = None
    # --include-suppressed: send to addresses on the suppression list too, at creation and at
    # each claim (False for a job made before schema 9)
    include_suppressed: bool = False


@dataclass(frozen=True, kw_only=True)
class JobRecord(NewJob):
    """A job as stored: what it was created with (``NewJob``), and what the store adds."""

    id: int
    token: str  # makes the job's Message-IDs globally unique
    state: str  # a JobState value
    total: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None  # why the job stopped (aborted, paused)
    log_path: str | None
    # why a worker holds the job back and until when (POSIX seconds), while it waits
    waiting_for: str | None = None
    waiting_until: float | None = None


ROLES = ("viewer", "sender")
"""An API token's roles: ``viewer`` reads; ``sender`` also creates, cancels, resumes and
retries jobs."""


@dataclass(frozen=True)
class TokenRecord:
    """An API token as stored: never the token itself, only its SHA-256 (hex)."""

    name: str
    token_hash: str
    role: str  # one of ROLES
    created_at: float


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    job_id: int
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    sent: int
    # who "this host" is for pid checks (``liveness.this_host_id``); None: an older bulkmail's
    host_id: str | None = None
    # the store's time when it read this record to judge it (the database's clock on
    # PostgreSQL); None from plain reads. Liveness measures the heartbeat's age against it.
    read_at: float | None = None


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    job_id: int
    position: int
    row: int
    email: str
    name: str
    fields: dict[str, str]
    state: str  # a DeliveryState value
    attempts: int
    last_error: str | None
    next_attempt_at: float
    provider_message_id: str | None
    message_id: str
    sent_at: float | None
    worker_id: str | None
    in_doubt: bool


@dataclass(frozen=True)
class HistoryRecord:
    """One delivery to an address, with the job it belongs to (``bulkmail history``)."""

    job_id: int
    job_name: str | None
    subject: str  # the job's subject template
    dedupe_key: str | None
    email: str
    state: str  # a DeliveryState value
    attempts: int
    last_error: str | None
    sent_at: float | None
    created_at: float  # the job's


@dataclass(frozen=True)
class NewDelivery:
    row: int
    email: str
    name: str
    fields: Mapping[str, str]
    skip_reason: str | None = None


@dataclass(frozen=True)
class Counts:
    pending: int = 0
    sending: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    cancelled: int = 0
    expired: int = 0  # still pending at --not-after: never sent
    in_doubt: int = 0  # deliveries marked in doubt (resent after a crash), in any state
    sending_in_doubt: int = 0  # of those, the ones in ``sending`` right now
    # deliveries with such an event after the send (``events``): a delivery counts once
    delivered: int = 0
    bounced: int = 0  # a hard bounce or a reject
    soft_bounced: int = 0
    complained: int = 0  # a spam complaint
    unsubscribed: int = 0

    @property
    def total(self) -> int:
        return self.pending + self.sending + self.done

    @property
    def done(self) -> int:
        """Deliveries that reached a final state (sent, failed, skipped, cancelled or
        expired)."""
        return self.sent + self.failed + self.skipped + self.cancelled + self.expired


@dataclass(frozen=True)
class Claimed:
    delivery: DeliveryRecord


@dataclass(frozen=True)
class ClaimedBatch:
    """Several deliveries claimed in one transaction (``claim_batch``), in claim order."""

    deliveries: tuple[DeliveryRecord, ...]


@dataclass(frozen=True)
class Wait:
    """Nothing ready now; the earliest pending delivery is due in ``seconds``, or a cap
    holds the account back that long (``why`` says which, e.g. "hourly cap 30/30 on
    smtp:me@example.org")."""

    seconds: float
    why: str | None = None


@dataclass(frozen=True)
class Stop:
    """Stop claiming: the job is no longer running (``state``: its state, or
    ``WORKER_STOPPED`` for a worker taken for gone), or nothing is left."""

    state: str
    finished: bool = False  # nothing pending and nothing in flight


ClaimResult = Claimed | Wait | Stop
BatchClaimResult = ClaimedBatch | Wait | Stop


@dataclass(frozen=True)
class Registration:
    worker_id: str
    reclaimed: int  # deliveries found in 'sending' of dead workers: in doubt, to be resent


@dataclass(frozen=True)
class Reclaimed:
    """What a live worker found when it looked for the deliveries of gone workers."""

    reclaimed: int  # put back to 'pending', in doubt: they will be sent again
    elsewhere: int  # still in 'sending' under other live workers (they may come back)


@dataclass
class JobView:
    """A job with its counts and workers, for status/recent and the JSON document."""

    job: JobRecord
    counts: Counts
    workers: list[WorkerRecord] = field(default_factory=list)


WorkerAlive = Callable[[WorkerRecord], bool]


@dataclass(frozen=True)
class Outcome:
    """What happened to one claimed delivery, as the column values to commit."""

    delivery_id: int
    values: tuple[tuple[str, Any], ...]
    is_sent: bool = False
    # the message never reached the provider as one it might take (unreachable server, a
    # throttling refusal): the attempt is given back and the claim leaves the caps' log
    given_back: bool = False

    @classmethod
    def sent(cls, delivery_id: int, provider_message_id: str | None, now: float) -> Outcome:
        values = (
            ("state", DeliveryState.SENT),
            ("sent_at", now),
            ("provider_message_id", provider_message_id),
            ("last_error", None),
        )
        return cls(delivery_id, values, is_sent=True)

    @classmethod
    def failed(cls, delivery_id: int, error: str) -> Outcome:
        return cls(delivery_id, (("state", DeliveryState.FAILED), ("last_error", error)))

    @classmethod
    def retry(
        cls,
        delivery_id: int,
        error: str,
        next_attempt_at: float,
        in_doubt: bool = False,
        attempts: int | None = None,
    ) -> Outcome:
        """Back to pending until ``next_attempt_at``; ``attempts``: the count to record
        instead of the claimed one (an attempt that never reached the server is given
        back, and, unless ``in_doubt``, so is its place in the account's caps)."""
        values: tuple[tuple[str, Any], ...] = (
            ("state", DeliveryState.PENDING),
            ("last_error", error),
            ("next_attempt_at", next_attempt_at),
        )
        if in_doubt:
            values += (("in_doubt", True),)
        if attempts is not None:
            values += (("attempts", attempts),)
        return cls(delivery_id, values, given_back=attempts is not None and not in_doubt)


@dataclass(frozen=True)
class NewEvent:
    """One event about a sent message (a webhook's, a bounce's), before it is matched.

    ``event_id`` is unique (the provider's, or one derived from the bounce message): an
    event seen again is a duplicate and changes nothing. The delivery is found by
    ``delivery_id`` (with ``job_id``, from Mailtrap's ``custom_variables``), else by the
    Message-ID, else by the provider's message id; ``email`` must be its address."""

    event_id: str
    kind: str  # an EventKind value
    email: str
    at: float
    source: str  # "mailtrap", "dsn"
    detail: str | None = None
    job_id: int | None = None
    delivery_id: int | None = None
    message_id: str | None = None
    provider_message_id: str | None = None


@dataclass
class EventSummary:
    """What recording a batch of events did."""

    recorded: int = 0
    duplicates: int = 0
    unmatched: int = 0  # recorded, but no delivery of this store is theirs
    confirmed: int = 0  # deliveries in doubt that a ``delivery`` event marked sent
    suppressed: int = 0  # addresses added to the suppression list

    def add(self, other: EventSummary) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True)
class EventView:
    """An event of a job's delivery, for `status --bounced` and the report."""

    position: int
    email: str
    name: str
    kind: str
    at: float
    detail: str | None


@dataclass(frozen=True)
class Suppression:
    """An address later jobs skip: why (``reason``: bounced, complained, unsubscribed,
    added), when, in which job, and the server's words."""

    email: str
    reason: str
    at: float
    job_id: int | None
    detail: str | None


def suppression_reason(s: Suppression) -> str:
    """The skip reason of a suppressed address, e.g. "suppressed: bounced 2026-12-01 in job
    7: 550 5.1.1 user unknown"."""
    from datetime import UTC, datetime

    day = datetime.fromtimestamp(s.at, UTC).strftime("%Y-%m-%d")
    text = f"suppressed: {s.reason} {day}"
    if s.job_id is not None:
        text += f" in job {s.job_id}"
    if s.detail:
        text += f": {s.detail}"
    return text


def parse_message_id(value: str) -> tuple[int, int, str] | None:
    """(job, position, token) of a Message-ID ``message_id`` made, else None."""
    text = value.strip()
    if not (text.startswith("<bulkmail.") and text.endswith(">") and "@" in text):
        return None
    parts = text[len("<bulkmail.") : text.index("@")].split(".")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1]), parts[2]


def default_store_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("bulkmail")) / "bulkmail.db"


def store_url(location: str | os.PathLike[str] | None) -> str:
    """A store location (a path, a ``sqlite:///`` URL or another SQLAlchemy URL) as a URL."""
    if location is None or str(location) == "":
        return f"sqlite:///{default_store_path()}"
    text = str(location)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().absolute()}"


def _known(cls: type, row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's values for the record's fields (``SELECT *`` may bring more columns)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))
    return {k: v for k, v in row.items() if k in names}


_FIELDS: dict[type, frozenset[str]] = {}


def message_id(job_id: int, position: int, token: str, domain: str) -> str:
    """The Message-ID of a job's delivery at ``position``: stable (a resend after a crash
    carries the same one) and globally unique (``token`` is random per job)."""
    return f"<bulkmail.{job_id}.{position}.{token}@{domain}>"


def creating_error(job_id: int) -> str:
    """What a ``creating`` job says of itself: a job still ``creating`` after its command
    ended was interrupted while its deliveries were written, and can only be cancelled."""
    return f"interrupted while creating; bulkmail cancel {job_id}"


def creating_refusal(job_id: int) -> str:
    """Why a ``creating`` job is not run (``resume``, a worker)."""
    return (
        f"job {job_id} is creating: its list was never completely written (interrupted "
        f"while creating, or still being created); it never runs: bulkmail cancel {job_id}"
    )


def dedupe_reason(dedupe_key: str, job_id: int, state: str = DeliveryState.SENT) -> str:
    """Why an address is skipped under ``dedupe_key``: another job (``job_id``) has already
    sent it, or holds it (``pending``/``sending``) and will send it when it runs."""
    if state == DeliveryState.SENT:
        return f"already sent under dedupe key {dedupe_key!r} (job {job_id})"
    return (
        f"already queued under dedupe key {dedupe_key!r} in job {job_id}, which has not "
        f"finished (bulkmail resume {job_id})"
    )


def pick_dedupe(rows: Iterable[tuple[str, int, str]]) -> dict[str, tuple[int, str]]:
    """From (email_key, job_id, state) rows of other jobs under one key: per address, the
    job that sent it (the newest), else the newest job that still holds it."""

    def rank(job: int, state: str) -> tuple[bool, int]:
        return state == DeliveryState.SENT, job

    best: dict[str, tuple[int, str]] = {}
    for key, job, state in rows:
        held = best.get(key)
        if held is None or rank(job, state) > rank(*held):
            best[key] = (job, state)
    return best


def job_from_row(row: Mapping[str, Any]) -> JobRecord:
    values = _known(JobRecord, row)
    values["provider_settings"] = json.loads(values["provider_settings"])
    values["templates"] = json.loads(values["templates"])
    windows = values.get("windows")
    values["windows"] = tuple(json.loads(windows)) if windows else ()
    if "include_suppressed" in values:  # 0/1 from SQLite
        values["include_suppressed"] = bool(values["include_suppressed"])
    return JobRecord(**values)


def delivery_from_row(row: Mapping[str, Any]) -> DeliveryRecord:
    values = _known(DeliveryRecord, row)
    values["fields"] = json.loads(values["fields"])
    values["in_doubt"] = bool(values["in_doubt"])
    return DeliveryRecord(**values)


def worker_from_row(row: Mapping[str, Any]) -> WorkerRecord:
    return WorkerRecord(**_known(WorkerRecord, row))
