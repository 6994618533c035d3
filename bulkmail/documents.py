"""What a job looks like to a user: the JSON document, the effective state (``stalled``),
failures, skips and the per-delivery report. Read-only and light: ``status`` and ``recent``
import this, not the send machinery.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Collection, Iterator, Sequence
from datetime import UTC, datetime
from typing import IO, NotRequired, TypedDict

from bulkmail.liveness import STALE_AFTER, this_host, worker_alive
from bulkmail.store.contract import StoreReader
from bulkmail.store.records import (
    HARD_BOUNCES,
    DeliveryRecord,
    EventKind,
    EventView,
    HistoryRecord,
    JobState,
    JobView,
)


class WorkerDocument(TypedDict):
    id: str
    host: str
    pid: int
    started_at: str | None
    heartbeat_at: str | None
    stopped_at: str | None
    sent: int


class FailureDocument(TypedDict):
    email: str
    name: str
    attempts: int
    error: str | None


class SkipDocument(TypedDict):
    row: int
    email: str
    name: str
    reason: str | None


class BounceDocument(TypedDict):
    """A delivery's bounce, reject or complaint (``status --bounced``)."""

    position: int
    email: str
    name: str
    event: str  # an EventKind value
    at: str | None
    reason: str | None


class JobDocument(TypedDict):
    """A job as ``--json`` prints it (``status``, ``recent``, the sending commands), and
    the data behind the Rich views. ``failures``/``skips``: with ``status --failed/--skipped``."""

    id: int
    state: str
    provider: str
    provider_settings: dict[str, object]  # never a secret
    name: str  # the job's label (--name); a job made before names: its subject
    subject: str
    source: str
    total: int
    sent: int
    failed: int
    skipped: int
    pending: int
    sending: int
    cancelled: int
    expired: int
    in_doubt: int
    # after the send (delivery events, bounces): deliveries with such an event
    delivered: int
    bounced: int
    soft_bounced: int
    complained: int
    unsubscribed: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    rate: float
    burst: int
    concurrency: int
    dedupe_key: str | None
    include_suppressed: bool  # --include-suppressed: it sends to suppressed addresses too
    created_by: str | None  # the API token that created it; None: the command line
    error: str | None
    worker_pid: int | None
    worker_host: str | None
    heartbeat_at: str | None
    log_path: str | None
    waiting_for: str | None  # why a worker holds the job back (a cap, a window...)
    waiting_until: str | None  # until when (ISO 8601, UTC)
    not_before: str | None
    not_after: str | None
    tz: str | None
    windows: list[str]  # --window, as given (in tz)
    account: str  # the provider account whose caps the job obeys, shared with other jobs
    per_hour: int | None  # the account's caps in force when the job was created
    per_day: int | None
    recheck: bool  # --recheck: the database query runs again before each send
    workers: list[WorkerDocument]
    failures: NotRequired[list[FailureDocument]]
    skips: NotRequired[list[SkipDocument]]
    bounces: NotRequired[list[BounceDocument]]


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def effective_state(
    view: JobView, *, now: float, stale_after: float = STALE_AFTER, gone: Collection[str] = ()
) -> str:
    """The job's state as a user should see it: a ``running`` job none of whose workers is
    alive is ``stalled`` (``bulkmail resume`` takes it over). ``gone``: ids of workers to
    take as gone whatever the store says (a run that ended but could not record it)."""
    if view.job.state != JobState.RUNNING:
        return view.job.state
    host = this_host()
    live = [
        w
        for w in view.workers
        if w.id not in gone and worker_alive(w, now=now, host=host, stale_after=stale_after)
    ]
    return str(JobState.RUNNING if live else JobState.STALLED)


def job_document(
    view: JobView, *, now: float | None = None, gone: Collection[str] = ()
) -> JobDocument:
    """The job as the JSON document of the design (also the data behind the Rich views).

    A stalled job's deliveries in ``sending`` were in flight when its last worker died:
    they may have been delivered, so they count as ``in_doubt`` (not ``pending``) before
    any resume, as they will after it. ``gone``: as for ``effective_state``."""
    now = time.time() if now is None else now
    job, c = view.job, view.counts
    state = effective_state(view, now=now, gone=gone)
    pending, in_doubt = c.pending + c.sending, c.in_doubt
    if state == JobState.STALLED:
        # (those already marked in doubt, resent and in flight again, count once)
        pending, in_doubt = c.pending, c.in_doubt + c.sending - c.sending_in_doubt
    live = [w for w in view.workers if w.stopped_at is None]
    # a waiting note is the live worker's: a stalled job's is stale
    waiting = state == JobState.RUNNING and job.waiting_for is not None
    latest = max(live or view.workers, key=lambda w: w.heartbeat_at, default=None)
    return {
        "id": job.id,
        "state": state,
        "provider": job.provider,
        "provider_settings": dict(job.provider_settings),  # never a secret
        "name": job.name or job.subject,
        "subject": job.subject,
        "source": job.source,
        "total": job.total,
        "sent": c.sent,
        "failed": c.failed,
        "skipped": c.skipped,
        "pending": pending,
        "sending": c.sending,
        "cancelled": c.cancelled,
        "expired": c.expired,
        "in_doubt": in_doubt,
        "delivered": c.delivered,
        "bounced": c.bounced,
        "soft_bounced": c.soft_bounced,
        "complained": c.complained,
        "unsubscribed": c.unsubscribed,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "rate": job.rate,
        "burst": job.burst,
        "concurrency": job.concurrency,
        "dedupe_key": job.dedupe_key,
        "include_suppressed": job.include_suppressed,
        "created_by": job.created_by,
        "error": job.error,
        "worker_pid": latest.pid if latest and latest.stopped_at is None else None,
        "worker_host": latest.host if latest and latest.stopped_at is None else None,
        "heartbeat_at": iso(latest.heartbeat_at) if latest else None,
        "log_path": job.log_path,
        "waiting_for": job.waiting_for if waiting else None,
        "waiting_until": iso(job.waiting_until) if waiting else None,
        "not_before": iso(job.not_before),
        "not_after": iso(job.not_after),
        "tz": job.tz,
        "windows": list(job.windows),
        "account": job.account,
        "per_hour": job.per_hour,
        "per_day": job.per_day,
        "recheck": job.recheck_query is not None,
        "workers": [
            {
                "id": w.id,
                "host": w.host,
                "pid": w.pid,
                "started_at": iso(w.started_at),
                "heartbeat_at": iso(w.heartbeat_at),
                "stopped_at": iso(w.stopped_at),
                "sent": w.sent,
            }
            for w in view.workers
        ],
    }


def failures(store: StoreReader, job_id: int) -> list[FailureDocument]:
    return [
        {"email": d.email, "name": d.name, "attempts": d.attempts, "error": d.last_error}
        for d in store.deliveries(job_id, states=("failed",))
    ]


def skips(store: StoreReader, job_id: int) -> list[SkipDocument]:
    """The job's skipped deliveries: the source row and why it is not sent."""
    return [
        {"row": d.row, "email": d.email, "name": d.name, "reason": d.last_error}
        for d in store.deliveries(job_id, states=("skipped",))
    ]


BOUNCE_KINDS = (*HARD_BOUNCES, EventKind.SOFT_BOUNCE, EventKind.SPAM, EventKind.SUSPENSION)


def bounces(store: StoreReader, job_id: int) -> list[BounceDocument]:
    """The job's bounces, rejects and complaints, oldest first, with the server's words."""
    store.get_job(job_id)
    return [
        {
            "position": e.position,
            "email": e.email,
            "name": e.name,
            "event": e.kind,
            "at": iso(e.at),
            "reason": e.detail,
        }
        for e in store.job_events(job_id, kinds=[str(k) for k in BOUNCE_KINDS])
    ]


REPORT_COLUMNS = (
    "position",
    "row",
    "email",
    "name",
    "state",
    "attempts",
    "error",
    "sent_at",
    "message_id",
    "provider_message_id",
    "in_doubt",
    "last_event",
    "last_event_at",
    "last_event_detail",
)
_REPORT_BATCH = 1000


def _report_values(store: StoreReader, job_id: int) -> Iterator[tuple[object, ...]]:
    """Each delivery's report values in ``REPORT_COLUMNS`` order, as they are (numbers,
    None, a boolean ``in_doubt``), with its last event after the send; the events are read
    for a batch of deliveries' positions in one query."""
    store.get_job(job_id)  # JobNotFound before anything is written
    batch: list[DeliveryRecord] = []
    for d in store.deliveries(job_id, batch=_REPORT_BATCH):
        batch.append(d)
        if len(batch) >= _REPORT_BATCH:
            yield from _with_events(store, job_id, batch)
            batch = []
    if batch:
        yield from _with_events(store, job_id, batch)


def _with_events(
    store: StoreReader, job_id: int, batch: list[DeliveryRecord]
) -> Iterator[tuple[object, ...]]:
    last: dict[int, EventView] = {}
    span = (batch[0].position - 1, batch[-1].position)
    for e in store.job_events(job_id, positions=span):
        last[e.position] = e  # oldest first: the last one stays
    for d in batch:
        event = last.get(d.position)
        yield (
            d.position,
            d.row,
            d.email,
            d.name,
            d.state,
            d.attempts,
            d.last_error,
            iso(d.sent_at),
            d.message_id,
            d.provider_message_id,
            d.in_doubt,
            event.kind if event else None,
            iso(event.at) if event else None,
            event.detail if event else None,
        )


def write_report(store: StoreReader, job_id: int, out: IO[str]) -> int:
    """Write one CSV row per delivery, with its last event after the send (delivery,
    bounce...); returns the number of rows. Text a person typed is made inert for
    spreadsheets (``_cell``)."""
    rows = _report_values(store, job_id)
    first = next(rows, None)  # an unknown job raises before the header is written
    writer = csv.writer(out)
    writer.writerow(REPORT_COLUMNS)
    if first is None:
        return 0
    count = 0
    for values in itertools.chain((first,), rows):
        writer.writerow(_csv_cells(values))
        count += 1
    return count


_TYPED_TEXT = frozenset({"email", "name", "error", "last_event_detail"})


def _csv_cells(values: tuple[object, ...]) -> list[object]:
    cells: list[object] = []
    for column, value in zip(REPORT_COLUMNS, values, strict=True):
        if column == "in_doubt":
            cells.append("yes" if value else "")
        elif value is None:
            cells.append("")
        elif column in _TYPED_TEXT:
            cells.append(_cell(str(value)))
        else:
            cells.append(value)
    return cells


def report_rows(store: StoreReader, job_id: int) -> list[dict[str, object]]:
    """The report's rows for ``report --json``: the CSV's columns as keys, values as they
    are (numbers, ``null``, a boolean ``in_doubt``), nothing made inert for spreadsheets."""
    return [dict(zip(REPORT_COLUMNS, v, strict=True)) for v in _report_values(store, job_id)]


def _cell(text: str) -> str:
    """A value from a CSV or a server, made inert for spreadsheets: a cell starting with
    = + - @ (or a tab/CR) would run as a formula when the report is opened in one."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class HistoryDocument(TypedDict):
    """One delivery to an address as ``history --json`` prints it."""

    job: int
    name: str  # the job's name (its subject for a job made before names)
    dedupe_key: str | None
    email: str
    state: str
    attempts: int
    error: str | None
    sent_at: str | None
    job_created_at: str | None


def history_documents(records: Sequence[HistoryRecord]) -> list[HistoryDocument]:
    return [
        {
            "job": r.job_id,
            "name": r.job_name or r.subject,
            "dedupe_key": r.dedupe_key,
            "email": r.email,
            "state": r.state,
            "attempts": r.attempts,
            "error": r.last_error,
            "sent_at": iso(r.sent_at),
            "job_created_at": iso(r.created_at),
        }
        for r in records
    ]
