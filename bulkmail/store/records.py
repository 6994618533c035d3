"""The job store's plain records, shared by every backend and by the views.

Nothing here imports SQLAlchemy: ``bulkmail status`` and ``bulkmail recent`` read a SQLite
store through :mod:`bulkmail.store.lite` without paying for it.
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
    "SCHEMA_VERSION",
    "WORKER_STOPPED",
    "ClaimResult",
    "Claimed",
    "Counts",
    "DeliveryRecord",
    "DeliveryState",
    "HistoryRecord",
    "JobRecord",
    "JobState",
    "JobView",
    "NewDelivery",
    "NewJob",
    "Outcome",
    "Reclaimed",
    "Registration",
    "Stop",
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
    "pick_dedupe",
    "store_url",
    "worker_from_row",
]

SCHEMA_VERSION = 4  # 2: the partial index on deliveries.in_doubt; 3: workers.host_id;
# 4: jobs.name


class JobState(StrEnum):
    """A job's state as stored (the strings are the stored values: no migration).

    ``creating -> queued -> running -> completed``; a job is ``creating`` while its
    deliveries are written in batches (no worker runs it; one left ``creating`` was
    interrupted: it is cancelled, never run); ``running -> paused`` (Ctrl-C, too many transient
    failures), ``running -> aborted`` (fatal provider error), ``* -> cancelled``. ``paused``
    and ``aborted`` jobs resume. ``STALLED`` is never stored: it is how a ``running`` job
    whose workers are all gone is shown (``views.effective_state``).
    """

    CREATING = "creating"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    STALLED = "stalled"  # shown, never stored


class DeliveryState(StrEnum):
    """A delivery's state as stored: ``pending -> sending -> sent | failed``, ``skipped``,
    ``cancelled``. ``sending`` is committed before the provider is called."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


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
    # the job's label (--name; default: the source and the subject); None for a job made
    # before schema 4
    name: str | None = None


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
    # who "this host" is for pid checks (``procs.this_host_id``); None: an older bulkmail's
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
    in_doubt: int = 0  # deliveries marked in doubt (resent after a crash), in any state
    sending_in_doubt: int = 0  # of those, the ones in ``sending`` right now

    @property
    def total(self) -> int:
        return self.pending + self.sending + self.sent + self.failed + self.skipped + self.cancelled

    @property
    def done(self) -> int:
        """Deliveries that reached a final state (sent, failed, skipped or cancelled)."""
        return self.sent + self.failed + self.skipped + self.cancelled


@dataclass(frozen=True)
class Claimed:
    delivery: DeliveryRecord


@dataclass(frozen=True)
class Wait:
    """Nothing ready now; the earliest pending delivery is due in ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Stop:
    """Stop claiming: the job is no longer running (``state``: its state, or
    ``WORKER_STOPPED`` for a worker taken for gone), or nothing is left."""

    state: str
    finished: bool = False  # nothing pending and nothing in flight


ClaimResult = Claimed | Wait | Stop


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
        back)."""
        values: tuple[tuple[str, Any], ...] = (
            ("state", DeliveryState.PENDING),
            ("last_error", error),
            ("next_attempt_at", next_attempt_at),
        )
        if in_doubt:
            values += (("in_doubt", True),)
        if attempts is not None:
            values += (("attempts", attempts),)
        return cls(delivery_id, values)


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
    return JobRecord(**values)


def delivery_from_row(row: Mapping[str, Any]) -> DeliveryRecord:
    values = _known(DeliveryRecord, row)
    values["fields"] = json.loads(values["fields"])
    values["in_doubt"] = bool(values["in_doubt"])
    return DeliveryRecord(**values)


def worker_from_row(row: Mapping[str, Any]) -> WorkerRecord:
    return WorkerRecord(**_known(WorkerRecord, row))
