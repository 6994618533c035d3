"""Rich rendering: the live progress bar, the status panel, the recent table, summaries.

On a terminal the progress is a live bar; elsewhere (cron, a log file) it is one plain line
per step with no escape codes. Nothing here reads the store or sends anything: callers pass
documents (``jobs.job_document``) and events (``manager.Event``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from bulkmail.documents import (
    BounceDocument,
    FailureDocument,
    HistoryDocument,
    JobDocument,
    SkipDocument,
    job_document,
)

if TYPE_CHECKING:  # the send machinery is not loaded by status/recent
    from rich.console import OverflowMethod

    from bulkmail.jobs import DryRun
    from bulkmail.manager import Event
    from bulkmail.models import Message, Recipient
    from bulkmail.schedule import Calendar
    from bulkmail.store.records import Counts, JobView

STATE_STYLE = {
    "completed": "green",
    "running": "cyan",
    "queued": "cyan",
    "scheduled": "blue",
    "paused": "yellow",
    "stalled": "bold yellow",
    "aborted": "red",
    "cancelled": "magenta",
}


def shown(
    text: str | None,
    *,
    multiline: bool = False,
    style: str = "",
    no_wrap: bool | None = None,
    overflow: OverflowMethod | None = None,
) -> Text:
    """``text`` as a Rich ``Text`` that is safe to print on a terminal: control characters,
    escape sequences and other non-printable characters (which a hostile CSV or server
    can put in a name, an address, a reason or an error) are shown escaped, e.g. ``\\x1b``,
    never sent to the terminal. ``multiline`` keeps line feeds and tabs (message bodies);
    ``style``, ``no_wrap`` and ``overflow`` go to ``Text``."""
    text = text or ""
    if multiline:
        text = text.replace("\r\n", "\n")
    if not text.isprintable():
        text = _escaped(text, multiline=multiline)
    return Text(text, style=style, no_wrap=no_wrap, overflow=overflow)


def _escaped(text: str, *, multiline: bool) -> str:
    out: list[str] = []
    for ch in text:
        if ch.isprintable() or (multiline and ch in "\n\t"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def rate(per_second: float) -> str:
    """A rate as a person reads it: "unlimited", "20/s", "0.1/s (one every 10 s)"."""
    if per_second <= 0:
        return "unlimited"
    if per_second >= 1:
        return f"{per_second:g}/s"
    return f"{per_second:g}/s (one every {1 / per_second:g} s)"


class _BarWithNote(Progress):
    """A progress bar with one line under it (the last error, the retry countdown),
    rendered again at every refresh so that a countdown counts down."""

    def __init__(self, *columns: Any, note: Callable[[], RenderableType | None], **kw: Any):
        self._note = note  # first: the base class may render while it is set up
        super().__init__(*columns, **kw)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield from super().get_renderables()
        note = self._note()
        if note is not None:
            yield note


def new_progress(
    console: Console, note: Callable[[], RenderableType | None] | None = None
) -> Progress:
    if note is not None:
        return _BarWithNote(*_columns(), note=note, console=console, transient=False)
    return Progress(*_columns(), console=console, transient=False)


def _columns() -> tuple[Any, ...]:
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[current]}"),
    )


class RunDisplay:
    """Turns send-loop events into a live bar (terminal) or plain lines (anything else).

    ``done`` counts deliveries that reached a final state (``Counts.done``), so the bar of
    a resumed job starts where the last run stopped; ``settle`` ends it at the store's
    counts (the store also settles deliveries without an event: skips at claim time).
    """

    def __init__(
        self,
        console: Console,
        *,
        job_id: int,
        total: int,
        done: int,
        failed: int,
        live: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.clock = clock
        # the last error under the bar: (kind, email, error, when to retry by ``clock``)
        self._last: tuple[str, str, str, float | None] | None = None
        self.job_id = job_id
        self.total = total
        self.done = done
        self.failed = failed
        self.sent_now = 0
        self.live = live
        self.started = time.monotonic()
        self._first_sent = self.started
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._suggested_detach = False

    @contextmanager
    def running(self) -> Iterator[RunDisplay]:
        if not self.live:
            yield self
            return
        self._progress = new_progress(self.console, note=self.note)
        self._task = self._progress.add_task(
            f"job {self.job_id}",
            total=self.total,
            completed=self.done,
            failed=self.failed,
            speed="",
            current="",
        )
        with self._progress:
            yield self

    def _speed(self) -> str:
        """Messages per second between the first and the latest send of this run (nothing
        before the second: a burst's first message says nothing about the rate)."""
        now = time.monotonic()
        if self.sent_now < 2 or now <= self._first_sent:
            return ""
        per_s = (self.sent_now - 1) / (now - self._first_sent)
        return f"{per_s:.2f}/s" if per_s < 10 else f"{per_s:.0f}/s"

    def _waiting(self, event: Event) -> None:
        """A worker holds the job back (a cap, a window, --not-before, throttling): the
        bar shows the countdown, a plain line says it once; long waits suggest --detach."""
        left = max(0.0, event.until - time.time())
        line = f"waiting {duration(left)}: {event.error}"
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, current=line)
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        if left > 600 and not self._suggested_detach:
            self._suggested_detach = True
            self.console.print(
                f"a long wait: Ctrl-C, then `bulkmail resume {self.job_id} --detach` (or "
                "`bulkmail run-due` from cron) goes on in the background",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def note(self) -> Text | None:
        """The line under the live bar: the last error, and for a retry the countdown
        ("retrying ada@example.org in 10 s: 451 4.3.0 try later")."""
        last = self._last
        if last is None:
            return None
        kind, email, error, retry_at = last
        if kind == "retry" and retry_at is not None:
            left = retry_at - self.clock()
            when = f"in {math.ceil(left):.0f} s" if left > 0 else "now"
            text = f"retrying {email} {when}: {error}"
        else:
            text = f"last error: {email}: {error}"
        return Text(text, style="yellow", no_wrap=True, overflow="ellipsis")

    def handle(self, event: Event) -> None:
        if event.kind == "waiting":
            self._waiting(event)
            return
        with self._lock:
            if event.kind in ("retry", "failed") and event.error:
                retry_at = self.clock() + event.retry_in if event.kind == "retry" else None
                self._last = (event.kind, event.email, event.error, retry_at)
            elif event.kind == "sent" and self._last is not None and self._last[1] == event.email:
                # the retried message went out: what stays is the error, not the countdown
                self._last = ("error", *self._last[1:3], None)
            if event.kind == "sent":
                self.done += 1
                self.sent_now += 1
                if self.sent_now == 1:
                    self._first_sent = time.monotonic()
            elif event.kind == "failed":
                self.done += 1
                self.failed += 1
            if self._progress is not None and self._task is not None:
                current = event.email if event.kind == "sending" else ""
                self._progress.update(
                    self._task,
                    completed=self.done,
                    failed=self.failed,
                    speed=self._speed(),
                    current=current,
                )
                return
        if event.kind in ("sent", "failed", "retry"):
            line = f"[{self.done}/{self.total}] {event.kind} {event.email}"
            if event.kind == "retry" and event.retry_in > 0:
                line += f" (again in {math.ceil(event.retry_in):.0f} s)"
            if event.error:
                line += f": {event.error}"
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def settle(self, counts: Counts) -> None:
        """Move the bar to the store's counts at the end of the run (never back: a store
        that could not be read gives empty counts)."""
        with self._lock:
            self.done = max(self.done, counts.done)
            self.failed = max(self.failed, counts.failed)
            if self._progress is not None and self._task is not None:
                self._progress.update(
                    self._task, completed=self.done, failed=self.failed, current=""
                )


def status_panel(doc: JobDocument) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("state", _state(doc["state"]))
    if doc.get("name") and doc["name"] != doc["subject"]:
        table.add_row("name", shown(doc["name"]))
    table.add_row("provider", shown(_transport(doc)))
    table.add_row("source", shown(str(doc.get("source") or "")))
    table.add_row("subject", shown(doc["subject"]))
    counts = Text()
    for key, count, style in (
        ("sent", doc["sent"], "green"),
        ("failed", doc["failed"], "red"),
        ("pending", doc["pending"], "cyan"),
        ("skipped", doc["skipped"], "yellow"),
        ("cancelled", doc["cancelled"], "magenta"),
        ("expired", doc.get("expired", 0), "magenta"),
    ):
        if key == "expired" and not count:
            continue
        counts.append(f"{count} {key}", style=style)
        counts.append("  ")
    counts.append(f"of {doc['total']}")
    table.add_row("deliveries", counts)
    after = Text()
    for key, style in (
        ("delivered", "green"),
        ("bounced", "red"),
        ("soft_bounced", "yellow"),
        ("complained", "red"),
        ("unsubscribed", "magenta"),
    ):
        count = int(doc.get(key, 0) or 0)  # type: ignore[call-overload]
        if count:
            after.append(f"{count} {key.replace('_', ' ')}", style=style)
            after.append("  ")
    if after:
        table.add_row("after the send", after)
    if doc["in_doubt"] and doc["state"] == "stalled":
        table.add_row(
            "in doubt",
            f"{doc['in_doubt']}: may have been delivered (in flight when the worker stopped); "
            f"resume sends them again with the same Message-ID",
        )
    elif doc["in_doubt"]:
        table.add_row("in doubt", f"{doc['in_doubt']} resent after a crash (same Message-ID)")
    table.add_row("rate", f"{rate(doc['rate'])}, burst {doc['burst']}")
    if doc.get("dedupe_key"):
        table.add_row("dedupe key", doc["dedupe_key"])
    for label, when in (
        ("created", doc["created_at"]),
        ("started", doc["started_at"]),
        ("finished", doc["finished_at"]),
    ):
        if when:
            table.add_row(label, when)
    if doc["worker_pid"]:
        table.add_row(
            "worker",
            f"pid {doc['worker_pid']} on {doc['worker_host']}, heartbeat {doc['heartbeat_at']}",
        )
    if doc.get("log_path"):
        table.add_row("log", doc["log_path"])
    waiting = waiting_line(doc)
    if waiting:
        table.add_row("waiting", shown(waiting, style="yellow"))
    if doc.get("error"):
        table.add_row("stopped by", shown(doc["error"], style="red"))
    hint = next_step(doc)
    if hint:
        table.add_row("next", Text(hint, style="dim"))
    return Panel(table, title=f"job {doc['id']}", expand=False)


def waiting_line(doc: JobDocument) -> str | None:
    """ "daily cap 150/150 on smtp:office@smtp.example.edu; next send 2026-12-02 08:00 CET
    (Europe/Berlin)", or None when no worker holds the job back."""
    why, until = doc.get("waiting_for"), doc.get("waiting_until")
    if not why:
        return None
    if not until:
        return str(why)
    from datetime import datetime

    from bulkmail.errors import BulkmailError
    from bulkmail.schedule import parse_zone, zone_name

    try:
        zone = parse_zone(doc.get("tz"))
    except BulkmailError:  # a zone this machine does not know: the local one
        zone = parse_zone(None)
    local = datetime.fromisoformat(str(until).replace("Z", "+00:00")).astimezone(zone)
    return f"waiting: {why}; next send {local:%Y-%m-%d %H:%M} {local.tzname()} ({zone_name(zone)})"


def _transport(doc: JobDocument) -> str:
    """The provider and where it sends: the outbox folder, the SMTP server, the API."""
    from bulkmail.providers.registry import describe

    return describe(str(doc["provider"]), doc.get("provider_settings") or {})


def next_step(doc: JobDocument) -> str:
    job = doc["id"]
    state = doc["state"]
    if state in ("paused", "aborted", "stalled"):
        return f"bulkmail resume {job}"
    if state == "completed" and doc["failed"]:
        return f"bulkmail status {job} --failed; bulkmail retry {job}"
    if state == "completed" and doc["skipped"]:
        return f"bulkmail status {job} --skipped (why {doc['skipped']} were not sent)"
    if state in ("running", "queued"):
        return f"bulkmail status {job} --watch"
    if state == "scheduled":
        return "bulkmail run-due (from cron or a systemd timer) starts it when its time comes"
    return ""


def workers_table(doc: JobDocument) -> Table | None:
    if len(doc["workers"]) < 2:
        return None
    table = Table(title="workers")
    for col in ("host", "pid", "started", "heartbeat", "stopped", "sent"):
        table.add_column(col)
    for w in doc["workers"]:
        table.add_row(
            w["host"],
            str(w["pid"]),
            w["started_at"],
            w["heartbeat_at"],
            w["stopped_at"] or "",
            str(w["sent"]),
        )
    return table


def failures_table(failures: Sequence[FailureDocument]) -> Table:
    table = Table(title=f"{len(failures)} failed deliveries")
    table.add_column("email")
    table.add_column("name")
    table.add_column("attempts", justify="right")
    table.add_column("error")
    for f in failures:
        table.add_row(shown(f["email"]), shown(f["name"]), str(f["attempts"]), shown(f["error"]))
    return table


def skips_table(skips: Sequence[SkipDocument]) -> Table:
    table = Table(title=f"{len(skips)} skipped deliveries (not sent)")
    table.add_column("row", justify="right")
    table.add_column("email")
    table.add_column("name")
    table.add_column("reason")
    for s in skips:
        table.add_row(str(s["row"]), shown(s["email"]), shown(s["name"]), shown(s["reason"]))
    return table


def bounces_table(bounces: Sequence[BounceDocument]) -> Table:
    table = Table(title=f"{len(bounces)} bounces, rejects and complaints")
    for col in ("email", "name", "event", "at", "reason"):
        table.add_column(col)
    for b in bounces:
        table.add_row(
            shown(b["email"]), shown(b["name"]), b["event"], b["at"] or "", shown(b["reason"])
        )
    return table


def suppressions_table(entries: Sequence[dict[str, object]]) -> Table:
    table = Table(title=f"{len(entries)} suppressed addresses")
    for col in ("email", "reason", "since", "job", "detail"):
        table.add_column(col)
    for e in entries:
        job = e.get("job_id")
        table.add_row(
            shown(str(e["email"])),
            shown(str(e["reason"])),
            str(e.get("at") or ""),
            "" if job is None else str(job),
            shown(str(e.get("detail") or "")),
        )
    return table


def recent_table(docs: Sequence[JobDocument]) -> Table:
    from rich import box

    table = Table(title="recent jobs", box=box.SIMPLE_HEAD, pad_edge=False)
    width = max((len(str(d["total"])) for d in docs), default=1)
    table.add_column("id", justify="right", no_wrap=True, min_width=len(str(docs[0]["id"])))
    table.add_column("state", no_wrap=True, min_width=9)
    # the name is the one column that gives way on a narrow terminal
    table.add_column("name", max_width=40)
    table.add_column("sent", justify="right", no_wrap=True, min_width=2 * width + 1)
    table.add_column("failed", justify="right", no_wrap=True, min_width=6)
    table.add_column("pending", justify="right", no_wrap=True, min_width=7)
    table.add_column("created (UTC)", no_wrap=True, min_width=16)
    for d in docs:
        created = (d["created_at"] or "").replace("T", " ")[:16]
        table.add_row(
            str(d["id"]),
            _state(d["state"]),
            shown(d["name"], no_wrap=True, overflow="ellipsis"),
            f"{d['sent']}/{d['total']}",
            str(d["failed"]) + (f" +{d['expired']} expired" if d.get("expired") else ""),
            str(d["pending"]),
            created,
        )
    return table


def history_table(address: str, docs: Sequence[HistoryDocument]) -> Table:
    from rich import box

    table = Table(title=f"deliveries to {address}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("job", justify="right", no_wrap=True)
    table.add_column("name", max_width=40)
    table.add_column("dedupe key")
    table.add_column("state", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True, min_width=16)
    for d in docs:
        when = (d["sent_at"] or d["job_created_at"] or "").replace("T", " ")[:16]
        table.add_row(
            str(d["job"]),
            shown(d["name"], no_wrap=True, overflow="ellipsis"),
            shown(d["dedupe_key"] or ""),
            _state(d["state"]),
            when,
        )
    return table


def summary(doc: JobDocument) -> Group:
    lines = [status_panel(doc)]
    return Group(*lines)


def _mailbox(name: str, address: str) -> Text:
    return shown(f"{name} <{address}>" if name else address)


def message_panel(message: Message, index: int) -> Panel:
    """One rendered message as it will be sent: headers, text body, HTML body, attachments."""
    head = Table.grid(padding=(0, 1))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("From:", _mailbox(message.from_name, message.from_email))
    head.add_row("To:", _mailbox(message.to_name, message.to_email))
    head.add_row("Subject:", shown(message.subject))
    for att in message.attachments:
        head.add_row(
            "Attach:", shown(f"{att.filename} ({att.content_type}, {len(att.data)} bytes)")
        )
    parts: list[RenderableType] = [head, Text(""), shown(message.text, multiline=True)]
    if message.html is not None:
        parts += [Text("--- HTML part ---", style="dim"), shown(message.html, multiline=True)]
    return Panel(Group(*parts), title=f"message {index}", expand=False)


def watch(
    console: Console,
    fetch: Callable[[], JobView],
    *,
    live: bool,
    interval: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> JobDocument:
    """Follow a job until it leaves running/queued; return its last document."""
    view = fetch()
    doc = job_document(view)
    if not live:
        last = None
        while True:
            line = (
                f"job {doc['id']} {doc['state']}: {doc['sent']} sent, {doc['failed']} failed, "
                f"{doc['pending']} pending of {doc['total']}"
            )
            if line != last:
                console.print(line, markup=False, highlight=False)
                last = line
            if doc["state"] not in ("running", "queued"):
                return doc
            sleep(interval)
            doc = job_document(fetch())
    progress = new_progress(console)
    task = progress.add_task(f"job {doc['id']}", total=doc["total"], failed=0, speed="", current="")
    started = time.monotonic()
    first_done = view.counts.done
    with Live(progress, console=console, refresh_per_second=8):
        while True:
            done = view.counts.done
            elapsed = time.monotonic() - started
            speed = f"{(done - first_done) / elapsed:.2f}/s" if elapsed > 1 else ""
            progress.update(
                task, completed=done, failed=doc["failed"], speed=speed, current=doc["state"]
            )
            if doc["state"] not in ("running", "queued"):
                return doc
            sleep(interval)
            view = fetch()
            doc = job_document(view)


def parse_selection(text: str, count: int) -> set[int]:
    """Parse "1-3, 5 8" (1-based indexes into a list of ``count``) or "all"; raises ValueError
    with a message naming the bad part."""
    text = text.strip().lower()
    if text in ("all", "*"):
        return set(range(1, count + 1))
    picked: set[int] = set()
    for part in text.replace(",", " ").split():
        lo, sep, hi = part.partition("-")
        try:
            start = int(lo)
            end = int(hi) if sep else start
        except ValueError:
            raise ValueError(f"{part!r} is not a number or a range like 3-7") from None
        if not (1 <= start <= end <= count):
            raise ValueError(f"{part!r} is outside 1-{count}")
        picked.update(range(start, end + 1))
    if not picked:
        raise ValueError("nothing selected")
    return picked


def select_rows(
    console: Console, recipients: Sequence[Recipient], *, ask: Callable[[str], str]
) -> set[int]:
    """Show a numbered table of recipients and ask which to send to (numbers and ranges):
    the command-line counterpart of a list of checkboxes. Returns the chosen source rows.
    ``ask`` puts a question to the user and returns the answer."""
    table = Table(title="recipients")
    table.add_column("#", justify="right")
    table.add_column("email")
    table.add_column("name")
    table.add_column("note")
    for n, r in enumerate(recipients, 1):
        table.add_row(str(n), shown(r.email), shown(r.name), shown(r.skip_reason, style="yellow"))
    console.print(table)
    while True:
        answer = ask("Send to which (e.g. 1-3,5 or all)")
        try:
            chosen = parse_selection(answer, len(recipients))
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            continue
        return {recipients[n - 1].row for n in chosen}


def dry_run_document(summary: DryRun) -> dict[str, object]:
    """What ``--dry-run --json`` prints: the job ``status --json`` would show once created,
    under the same keys (``total``, ``pending``, ``skipped`` counts, the ``skips`` rows as
    ``status --skipped``), plus what only a dry run knows."""
    return {
        "dry_run": True,
        "source": summary.source,
        "provider": summary.provider,
        "total": summary.to_send + len(summary.skipped),
        "pending": summary.to_send,
        "skipped": len(summary.skipped),
        "skips": [{"row": r, "email": e, "reason": why} for r, e, why in summary.skipped],
        "empty_values": dict(summary.empty_values),
        "refused": [{"row": r, "email": e, "error": why} for r, e, why in summary.refused],
        "rate": summary.rate,
        "burst": summary.burst,
        "estimated_seconds": round(summary.estimated_seconds, 1),
        "calendar": None if summary.calendar is None else calendar_document(summary.calendar),
    }


def empty_values_note(summary: DryRun) -> str:
    """'; 2 rows leave 'course' empty' for the confirmation line ('' when none do)."""
    return "".join(
        f"; {rows} row{'s' if rows != 1 else ''} leave{'s' if rows == 1 else ''} {name!r} empty"
        for name, rows in summary.empty_values.items()
    )


def calendar_document(cal: Calendar) -> dict[str, object]:
    """The calendar in JSON: per local day how many go out, when the first and the last
    go (ISO UTC) and how many would expire at --not-after."""
    from bulkmail.documents import iso
    from bulkmail.schedule import zone_name

    return {
        "tz": zone_name(cal.tz),
        "days": [{"date": d.date.isoformat(), "count": d.count} for d in cal.days],
        "starts_at": iso(cal.starts_at),
        "finishes_at": iso(cal.finishes_at),
        "expiring": cal.expiring,
        "not_after": iso(cal.not_after),
        "text": calendar_line(cal),
    }


def calendar_line(cal: Calendar) -> str:
    """ "150 today until 18:00, 150 Tue, 42 Wed; done about Wed 09:12 CET"."""
    from bulkmail.schedule import describe

    return describe(cal)


def calendar_warning(cal: Calendar) -> str | None:
    """ "cannot finish before --not-after 2026-12-04 17:00 CET: 310 would expire", or None."""
    from bulkmail.schedule import warning

    return warning(cal)


def dry_run_view(summary: DryRun) -> Group:
    """What a send would do: how many messages, how long at the rate, and every skipped row
    with its reason."""
    head = Text()
    head.append("dry run of ", style="bold")
    head.append_text(shown(summary.source, style="bold"))
    head.append(": ", style="bold")
    head.append(f"{summary.to_send} to send", style="green")
    head.append(f", {len(summary.skipped)} skipped", style="yellow" if summary.skipped else "")
    if summary.rate > 0:
        head.append(f", via {summary.provider} at {rate(summary.rate)}, burst {summary.burst}")
        if summary.calendar is None:  # else the calendar says when it ends
            head.append(f": about {duration(summary.estimated_seconds)}")
    else:
        head.append(f", via {summary.provider} with no rate limit")
    parts: list[RenderableType] = [head]
    if summary.empty_values:
        counts = ", ".join(
            f"{name!r} in {rows} row{'s' if rows != 1 else ''}"
            for name, rows in summary.empty_values.items()
        )
        parts.append(Text(f"empty values: {counts} (see --on-empty)", style="yellow"))
    if summary.refused:
        title = "refused (the command fails: fill the values in, or --on-empty)"
        parts.append(_rows_table(title, "error", summary.refused))
    if summary.calendar is not None:
        line = Text("calendar: ", style="bold")
        line.append(calendar_line(summary.calendar))
        parts.append(line)
        warning = calendar_warning(summary.calendar)
        if warning:
            parts.append(Text(f"warning: {warning}", style="yellow"))
    if summary.skipped:
        parts.append(
            _rows_table("skipped (not sent, recorded with the reason)", "reason", summary.skipped)
        )
    parts.append(Text("nothing was sent and no job was created", style="dim"))
    return Group(*parts)


def _rows_table(title: str, why: str, rows: Sequence[tuple[int, str, str]]) -> Table:
    """The dry run's source rows (row, email, and why: a skip reason or an error)."""
    table = Table(title=title)
    table.add_column("row", justify="right")
    table.add_column("email")
    table.add_column(why)
    for row, email, text in rows:
        table.add_row(str(row), shown(email), shown(text))
    return table


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
