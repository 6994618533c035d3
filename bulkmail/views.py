"""What a job looks like to a user: the JSON document, the effective state (``stalled``),
failures, skips and the per-delivery report. Read-only and light: ``status`` and ``recent``
import this, not the send machinery.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import IO, NotRequired, TypedDict

from bulkmail.procs import STALE_AFTER, this_host, worker_alive
from bulkmail.store.contract import StoreReader
from bulkmail.store.records import HistoryRecord, JobState, JobView


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
    in_doubt: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    rate: float
    burst: int
    concurrency: int
    dedupe_key: str | None
    error: str | None
    worker_pid: int | None
    worker_host: str | None
    heartbeat_at: str | None
    log_path: str | None
    workers: list[WorkerDocument]
    failures: NotRequired[list[FailureDocument]]
    skips: NotRequired[list[SkipDocument]]


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
        "in_doubt": in_doubt,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "rate": job.rate,
        "burst": job.burst,
        "concurrency": job.concurrency,
        "dedupe_key": job.dedupe_key,
        "error": job.error,
        "worker_pid": latest.pid if latest and latest.stopped_at is None else None,
        "worker_host": latest.host if latest and latest.stopped_at is None else None,
        "heartbeat_at": iso(latest.heartbeat_at) if latest else None,
        "log_path": job.log_path,
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
)


def write_report(store: StoreReader, job_id: int, out: IO[str]) -> int:
    """Write one CSV row per delivery; returns the number of rows."""
    store.get_job(job_id)  # JobNotFound before writing a header
    writer = csv.writer(out)
    writer.writerow(REPORT_COLUMNS)
    count = 0
    for d in store.deliveries(job_id):
        writer.writerow(
            [
                d.position,
                d.row,
                _cell(d.email),
                _cell(d.name),
                d.state,
                d.attempts,
                _cell(d.last_error or ""),
                iso(d.sent_at) or "",
                d.message_id,
                d.provider_message_id or "",
                "yes" if d.in_doubt else "",
            ]
        )
        count += 1
    return count


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
