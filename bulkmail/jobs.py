"""The core operations the CLI calls: plan a job from options, create it, run it in the
foreground or detached, and describe it. No terminal I/O here: results are returned as data
and the CLI renders them."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from bulkmail.compose import Composer, Templates
from bulkmail.config import PROVIDERS, Settings
from bulkmail.errors import BulkmailError, ExitCode, InputError, JobStateError, exit_code_for
from bulkmail.manager import THROTTLE_PAUSE_AFTER, EmailManager, Event
from bulkmail.models import Message, Recipient
from bulkmail.providers import (
    Provider,
    account_key,
    check_provider,
    make_provider,
    preflight,
    with_defaults,
)
from bulkmail.schedule import Calendar, Timing, plan_calendar, timing, zone_name
from bulkmail.sources import (
    DEFAULT_QUERY,
    Source,
    is_xlsx,
    open_csv,
    open_db,
    open_xlsx,
    recheck_location,
    select,
)
from bulkmail.store import (
    JobRecord,
    JobState,
    JobStore,
    JobView,
    NewDelivery,
    NewJob,
    StoreReader,
    dedupe_reason,
)
from bulkmail.store.records import Suppression, creating_refusal, suppression_reason


def data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("bulkmail"))


# --------------------------------------------------------------------------- planning


ON_EMPTY = ("skip", "fail", "send")
"""What ``--on-empty`` may say; None (the default) is 'fail' when the subject prints the
empty value, 'skip' otherwise."""


@dataclass(frozen=True)
class SourceOptions:
    csv: str | None = None
    db: str | None = None
    query: str | None = None
    xlsx: str | None = None
    sheet: str | None = None
    encoding: str | None = None
    on_empty: str | None = None  # one of ON_EMPTY, or None for the default
    template: str = ""
    html_template: str | None = None
    subject: str = ""
    attach: Sequence[str] = ()
    sender: str | None = None
    only: Sequence[str] = ()
    exclude: Sequence[str] = ()
    # what every message carries; None: [defaults] reply_to / cc / bcc of the config
    reply_to: str | None = None
    cc: Sequence[str] | None = None
    bcc: Sequence[str] | None = None
    headers: Sequence[str] = ()  # --header NAME:VALUE, on top of the default headers


@dataclass(frozen=True)
class SendOptions:
    provider: str | None = None
    rate: float | None = None
    burst: int | None = None
    concurrency: int = 1
    max_retries: int = 3
    backoff: float = 5.0
    dedupe_key: str | None = None
    # the calendar (bulkmail.schedule), as given on the command line; checked by ``plan``
    windows: Sequence[str] = ()  # --window, repeatable
    tz: str | None = None  # None: the local zone
    not_before: str | None = None  # ISO 8601; naive: in tz
    not_after: str | None = None
    per_hour: int | None = None  # None: the provider section's per_hour (0 there: none)
    per_day: int | None = None
    include_suppressed: bool = False  # send to addresses on the suppression list too
    name: str | None = None  # --name; None: the source's file or database and the subject
    recheck: bool = False  # --recheck: run the database query again before each send


@dataclass
class Plan:
    """Everything needed to create a job, validated."""

    settings: Settings
    provider: str
    sender: str
    source: Source
    templates: Templates
    composer: Composer
    only: Sequence[str]
    exclude: Sequence[str]
    rate: float
    burst: int
    send: SendOptions
    chosen: set[int] | None = None  # rows picked with --select
    on_empty: str | None = None  # --on-empty: one of ON_EMPTY, None for the default
    # column -> (the name a template prints it by, the template parts printing it)
    printed: Mapping[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    # windows, zone, --not-before/--not-after (POSIX seconds) and the caps, checked
    timing: Timing = field(default_factory=Timing)
    source_label: str = "recipients"  # the file or database name (the default job name)
    # --recheck: the database URL as given (its password in memory only) and the query
    recheck: tuple[str, str] | None = None

    def _rows(self) -> Iterator[Recipient]:
        rows = select(self.source, self.only, self.exclude)
        if self.chosen is None:
            return rows
        chosen = self.chosen
        return (r for r in rows if r.row in chosen)

    def screened(self) -> Iterator[Screened]:
        """Each recipient with the template variables it leaves empty and what --on-empty
        makes of them: the recipient skipped with the reason, or a ``fatal`` message."""
        for r, empty, fatal in self._screen():
            yield Screened(r, empty, fatal)

    def _screen(self) -> Iterator[_Row]:
        """``screened`` as (recipient, empty values, fatal) tuples: no object per row."""
        columns = tuple(self.printed)
        blanks = ("",) * len(columns)
        for r in self._rows():
            if r.skip_reason is not None or not columns:
                yield r, (), None
                continue
            if "" not in map(str.strip, map(r.fields.get, columns, blanks)):
                yield r, (), None  # every printed value is there (the usual row)
                continue
            empty = [
                EmptyValue(name, parts)
                for column, (name, parts) in self.printed.items()
                if not r.fields.get(column, "").strip()
            ]
            s = self._decide(r, empty)
            yield s.recipient, s.empty, s.fatal

    def _decide(self, r: Recipient, empty: list[EmptyValue]) -> Screened:
        where = f"{self.source.description}: row {r.row}"
        if self.on_empty == "send":
            return Screened(r, empty)
        if self.on_empty == "fail":
            first = empty[0]
            fatal = f"{where}: {first.reason}; fill it in, or pass --on-empty skip (or send)"
            return Screened(r, empty, fatal)
        in_subject = [e for e in empty if "subject" in e.parts]
        if in_subject and self.on_empty is None:
            fatal = (
                f"{where}: {in_subject[0].reason}; fill it in, or pass --on-empty skip (or send)"
            )
            return Screened(r, empty, fatal)
        reason = "; ".join(e.reason for e in empty)
        return Screened(replace(r, skip_reason=reason), empty)

    def recipients(self) -> Iterator[Recipient]:
        """The recipients to send to (or skip, with the reason); InputError for a row that
        --on-empty (or its default) makes a mistake."""
        for s in self.screened():
            if s.fatal is not None:
                raise InputError(s.fatal)
            yield s.recipient


@dataclass(frozen=True)
class EmptyValue:
    """A template variable a row leaves empty, and which template parts print it."""

    name: str
    parts: tuple[str, ...]  # 'subject', 'text template', 'HTML template', 'attachment path'

    @property
    def reason(self) -> str:
        return f"empty {self.name!r} (used by the {' and the '.join(self.parts)})"


@dataclass(frozen=True)
class Screened:
    recipient: Recipient
    empty: Sequence[EmptyValue] = ()
    fatal: str | None = None  # the error this row is under --on-empty (exit 2)


_Row = tuple[Recipient, Sequence[EmptyValue], str | None]  # a Screened's fields, as a tuple


def open_source(opts: SourceOptions) -> Source:
    """The source the options name: a CSV (an Excel workbook given to --csv is read as
    one: its content says what it is, and refusing would only make the user retype the
    command), an Excel sheet or a database query."""
    if [bool(opts.csv), bool(opts.xlsx), bool(opts.db)].count(True) != 1:
        raise InputError("give exactly one recipient source: --csv PATH, --xlsx PATH or --db URL")
    if opts.query and not opts.db:
        raise InputError("--query needs --db URL")
    excel = opts.xlsx or (opts.csv if opts.csv and is_xlsx(opts.csv) else None)
    if opts.sheet is not None and not excel:
        raise InputError("--sheet needs --xlsx PATH (an Excel workbook)")
    if opts.encoding is not None and not opts.csv:
        raise InputError("--encoding is for a CSV file (--csv PATH)")
    if excel:
        if opts.encoding is not None:
            raise InputError(f"--encoding: {excel} is an Excel workbook, which needs none")
        return open_xlsx(excel, opts.sheet)
    if opts.csv:
        return open_csv(opts.csv, encoding=opts.encoding)
    assert opts.db is not None
    return open_db(opts.db, opts.query)


def plan_timing(send: SendOptions, settings: Settings, provider: str, *, now: float) -> Timing:
    """The time options checked (bulkmail.schedule.timing); a cap not given as a flag (or
    BULKMAIL_PER_HOUR/BULKMAIL_PER_DAY) comes from the provider's config section."""
    section = settings.section(provider)
    caps: dict[str, tuple[int | None, str]] = {}
    for key, flag in (("per_hour", send.per_hour), ("per_day", send.per_day)):
        if flag is not None:
            caps[key] = (flag, f"--{key.replace('_', '-')} (or BULKMAIL_{key.upper()})")
        else:
            configured: int = getattr(section, key)
            source = f"{key} ([{provider}] in the config file or BULKMAIL_{provider.upper()}_"
            caps[key] = (configured or None, f"{source}{key.upper()})")
    return timing(
        windows=send.windows,
        tz=send.tz,
        not_before=send.not_before,
        not_after=send.not_after,
        per_hour=caps["per_hour"][0],
        per_day=caps["per_day"][0],
        per_hour_from=caps["per_hour"][1],
        per_day_from=caps["per_day"][1],
        now=now,
    )


def plan(
    opts: SourceOptions, send: SendOptions, settings: Settings, *, now: float | None = None
) -> Plan:
    """Check options, read the templates, open the source and check that every variable the
    templates use exists in the source. Raises InputError/ConfigError (exit 2). ``now``:
    the time --not-after must be after (default: the clock)."""
    provider = send.provider or settings.provider_name
    if provider not in PROVIDERS:
        raise InputError(f"--provider: must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    # flags win over the environment and the config file: name where a bad value came from
    rate = send.rate if send.rate is not None else settings.default_rate(provider)
    rate_from = "--rate" if send.rate is not None else "rate (BULKMAIL_RATE or the config file)"
    if not math.isfinite(rate) or rate < 0:
        raise InputError(
            f"{rate_from}: must be 0 (unlimited) or a positive number of emails per second, "
            f"got {rate}"
        )
    burst = send.burst if send.burst is not None else settings.burst
    burst_from = (
        "--burst" if send.burst is not None else "burst (BULKMAIL_BURST or the config file)"
    )
    if burst < 1:
        raise InputError(f"{burst_from}: must be at least 1, got {burst}")
    if send.concurrency < 1:
        raise InputError("--concurrency: must be at least 1")
    if send.max_retries < 0:
        raise InputError("--max-retries: must not be negative")
    if not math.isfinite(send.backoff) or send.backoff < 0:
        raise InputError(f"--backoff: must be a number of seconds, 0 or more, got {send.backoff}")
    if opts.on_empty is not None and opts.on_empty not in ON_EMPTY:
        raise InputError(f"--on-empty: must be skip, fail or send, got {opts.on_empty!r}")
    if send.recheck and not opts.db:
        raise InputError(
            "--recheck runs the course database's query again before each send: it needs "
            "--db URL (and --query), not a file"
        )
    when = plan_timing(send, settings, provider, now=time.time() if now is None else now)
    settings = with_defaults(provider, settings, data_dir=data_dir())
    check_provider(provider, settings)
    sender = opts.sender or settings.sender_for(provider)
    templates = Templates.load(
        subject=opts.subject,
        text_path=opts.template,
        html_path=opts.html_template,
        attach=opts.attach,
        reply_to=_given(opts.reply_to, settings.reply_to),
        cc=opts.cc if opts.cc is not None else settings.cc,
        bcc=opts.bcc if opts.bcc is not None else settings.bcc,
        headers=opts.headers,
    )
    composer = Composer(templates, sender=sender)
    source = open_source(opts)
    # every variable a column (by its name, its snake_case name or columns["..."]), the
    # closest named when not; a clash of snake_case names the templates use is a warning
    source.warnings.extend(composer.check_columns(source.columns, source.description))
    # CR/LF are fine in the columns that only reach the body
    source.header_columns = frozenset(composer.header_columns(source.columns))
    return Plan(
        settings=settings,
        provider=provider,
        sender=sender,
        source=source,
        templates=templates,
        composer=composer,
        only=opts.only,
        exclude=opts.exclude,
        rate=rate,
        burst=burst,
        send=send,
        on_empty=opts.on_empty,
        printed=composer.printed_columns(source.columns),
        timing=when,
        source_label=_source_label(opts),
        recheck=(opts.db, opts.query or DEFAULT_QUERY) if send.recheck and opts.db else None,
    )


def _given(flag: str | None, configured: str) -> tuple[str, ...]:
    value = configured if flag is None else flag
    return (value,) if value.strip() else ()


MAX_NAME_LENGTH = 200


def job_name(plan: Plan) -> str:
    """The job's label: ``--name``, else the source's file (or database) name and the
    subject template ("Reminder: {{ course }} (instructors.csv)")."""
    given = plan.send.name
    if given is not None:
        name = " ".join(given.split())
        if not name:
            raise InputError("--name: empty")
        if len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise InputError(f"--name: at most {MAX_NAME_LENGTH} printable characters")
        return name
    return f"{plan.templates.subject} ({plan.source_label})"


def _source_label(opts: SourceOptions) -> str:
    """The source as a job's default name shows it: the file's name, or the database's."""
    path = opts.xlsx or opts.csv
    if path:
        return Path(path).name
    try:
        from sqlalchemy.engine import make_url

        url = make_url(opts.db or "")
    except Exception:  # an unparsable URL was refused when the source was opened
        return "database"
    return Path(url.database).name if url.database else url.get_backend_name()


def _vetted(plan: Plan) -> Iterator[Screened]:
    """The plan's recipients screened for empty values, each sendable one rendered once as
    it will be sent (exit 2 on a template problem): a message whose subject or body renders
    empty is never sent, skipped with the reason (or fatal, as an empty value would be)."""
    for r, empty, fatal in _vetted_rows(plan):
        yield Screened(r, empty, fatal)


def _vetted_rows(plan: Plan) -> Iterator[_Row]:
    """``_vetted`` as (recipient, empty values, fatal) tuples: no object per row."""
    origin = plan.source.description
    for r, empty, fatal in plan._screen():
        if r.skip_reason is None and fatal is None:
            blank = plan.composer.blank(r, origin)
            if blank is not None:
                reason = f"the {blank} renders empty"
                if plan.on_empty == "fail" or (plan.on_empty is None and blank == "subject"):
                    hint = "" if plan.on_empty == "fail" else " (or pass --on-empty skip)"
                    fatal = f"{origin}: row {r.row}: {reason}; nothing sent{hint}"
                else:
                    r = replace(r, skip_reason=reason)
        yield r, empty, fatal


def vetted(plan: Plan) -> Iterator[Screened]:
    """Every recipient of the plan as a dry run sees it (rendered once, skips and the rows
    --on-empty refuses marked): what the dashboard's table of recipients shows."""
    return _vetted(plan)


def _checked(plan: Plan, *, require_sendable: bool = True) -> Iterator[Recipient]:
    """The plan's recipients, each rendered once as it will be sent (exit 2 on the first
    template problem or row --on-empty makes fatal). Raises at the end when there is nobody
    to send to: no rows at all, or only rows that are skipped (invalid addresses,
    duplicates...): a job of nothing but skips is a mistake in the list, not a job. (Skips
    by --dedupe-key come later, in the store: a cron re-run that finds everyone already
    reminded is fine.)"""
    count = sendable = 0
    first_skip: Recipient | None = None
    for r, _, fatal in _vetted_rows(plan):
        if fatal is not None:
            raise InputError(fatal)
        if r.skip_reason is None:
            sendable += 1
        elif first_skip is None:
            first_skip = r
        count += 1
        yield r
    where = plan.source.description
    if count == 0:
        raise InputError(f"{where}: no recipients")
    if sendable == 0 and first_skip is not None and require_sendable:
        raise InputError(
            f"{where}: no valid recipient: all {count} rows are skipped "
            f"(row {first_skip.row}: {first_skip.skip_reason}); see --dry-run"
        )


def job_timing(t: Timing) -> dict[str, Any]:
    """What a job records of its calendar and caps. The caps are the account's, but they
    are recorded as in force at creation (flag, environment or config): a worker started
    later by `run-due` or `resume` has no flags, and each job counts every send on the
    account, so the strictest job's caps are never exceeded."""
    return {
        "windows": tuple(t.window_texts),
        "tz": zone_name(t.tz) if t.schedule.windows or t.not_before or t.not_after else None,
        "not_before": t.not_before,
        "not_after": t.not_after,
        "per_hour": t.per_hour,
        "per_day": t.per_day,
    }


def job_recheck(plan: Plan) -> dict[str, Any]:
    """What a job records of --recheck: the query, and the URL without its password."""
    if plan.recheck is None:
        return {}
    url, query = plan.recheck
    return {"recheck_url": recheck_location(url), "recheck_query": query}


def create_job(
    store: JobStore, plan: Plan, *, now: float | None = None, created_by: str | None = None
) -> int:
    """Create the job and its deliveries, in batches under the state ``creating``, then
    ``queued`` (nothing is left behind when a row or template fails). ``created_by``: the
    API token's name that asked for it (None: the command line)."""
    t = plan.templates
    new = NewJob(
        provider=plan.provider,
        provider_settings=plan.settings.provider_public(plan.provider),
        account=account_key(plan.provider, plan.settings),
        sender=plan.sender,
        subject=t.subject,
        templates=t.to_json(),
        source=plan.source.description,
        rate=plan.rate,
        burst=plan.burst,
        concurrency=plan.send.concurrency,
        max_retries=plan.send.max_retries,
        backoff=plan.send.backoff,
        dedupe_key=plan.send.dedupe_key,
        **job_timing(plan.timing),
        **job_recheck(plan),
        created_by=created_by,
        name=job_name(plan),
    )
    rows = (NewDelivery(r.row, r.email, r.name, r.fields, r.skip_reason) for r in _checked(plan))
    domain = parseaddr(plan.sender)[1].rpartition("@")[2] or "bulkmail.local"
    return store.create_job(
        new,
        rows,
        now=time.time() if now is None else now,
        domain=domain,
        include_suppressed=plan.send.include_suppressed,
    )


@dataclass
class DryRun:
    source: str
    provider: str
    rate: float
    burst: int
    to_send: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # row, email, reason
    deduped: int = 0  # of the skipped: already sent under the --dedupe-key
    suppressed: int = 0  # of the skipped: on the suppression list
    # template variable -> rows (not skipped for another reason) that leave it empty
    empty_values: dict[str, int] = field(default_factory=dict)
    # rows --on-empty (or its default) refuses: row, email, the one-line error
    refused: list[tuple[int, str, str]] = field(default_factory=list)
    calendar: Calendar | None = None  # when any cap, window or --not-before/after is given

    @property
    def nothing_valid(self) -> bool:
        """Nobody to send to, and not because everyone was already reminded (exit 2)."""
        return self.to_send == 0 and self.deduped == 0 and self.suppressed == 0 and not self.refused

    @property
    def estimated_seconds(self) -> float:
        if self.rate <= 0 or self.to_send == 0:
            return 0.0
        return max(0.0, (self.to_send - self.burst) / self.rate)


def dry_run(
    plan: Plan,
    *,
    taken: Mapping[str, tuple[int, str]] | None = None,
    now: float | None = None,
    suppressed: Mapping[str, Suppression] | None = None,
    history: Sequence[float] = (),
) -> DryRun:
    """Validate and render everything as ``create_job`` would, and create nothing.

    ``taken``: the addresses other jobs under the plan's ``--dedupe-key`` have sent or hold
    (``Store.taken_under``), shown as the skips the real run will make; ``suppressed``: the
    suppression list by lower-cased address (skipped unless --include-suppressed). Rows --on-empty
    refuses are listed in ``refused`` rather than raised, so that the whole list is seen;
    the caller fails (exit 2) when there is one.
    With any of the caps, windows, --not-before or --not-after, the result has the job's
    calendar from ``now`` (default: the clock), counting ``history``: the account's sends of
    the last day by other jobs (``account_history``), which the caps count too."""
    result = DryRun(plan.source.description, plan.provider, plan.rate, plan.burst)
    key = plan.send.dedupe_key
    count = 0
    for s in _vetted(plan):
        r = s.recipient
        count += 1
        for empty in s.empty:
            result.empty_values[empty.name] = result.empty_values.get(empty.name, 0) + 1
        held = taken.get(r.email.lower()) if taken and key else None
        banned = None
        if suppressed and not plan.send.include_suppressed:
            banned = suppressed.get(r.email.lower())
        if s.fatal is not None:
            result.refused.append((r.row, r.email, s.fatal))
        elif r.skip_reason:
            result.skipped.append((r.row, r.email, r.skip_reason))
        elif banned is not None:
            result.skipped.append((r.row, r.email, suppression_reason(banned)))
            result.suppressed += 1
        elif key and held is not None:
            result.skipped.append((r.row, r.email, dedupe_reason(key, *held)))
            result.deduped += 1
        else:
            result.to_send += 1
    if count == 0:
        raise InputError(f"{plan.source.description}: no recipients")
    if plan.timing.active:
        at = time.time() if now is None else now
        result.calendar = calendar(plan, result.to_send, now=at, history=history)
    return result


def account_history(reader: StoreReader, plan: Plan, *, now: float | None = None) -> list[float]:
    """The plan's account's sends of the last day in the store (any job), which its caps
    count: what the dry run's calendar starts from. Empty when the plan has no caps."""
    if not (plan.timing.per_hour or plan.timing.per_day):
        return []
    at = time.time() if now is None else now
    account = account_key(plan.provider, plan.settings)
    return reader.account_sends(account, since=at - 86400.0)


def calendar(plan: Plan, count: int, *, now: float, history: Sequence[float] = ()) -> Calendar:
    """When ``count`` messages of the plan go out, starting at ``now`` or --not-before,
    under its rate, caps, windows and --not-after; ``history``: the account's sends before
    ``now`` that its rolling caps still count (``account_history``)."""
    t = plan.timing
    return plan_calendar(
        count,
        start=max(now, t.not_before or now),
        rate=plan.rate,
        burst=plan.burst,
        per_hour=t.per_hour,
        per_day=t.per_day,
        schedule=t.schedule,
        not_after=t.not_after,
        history=history,
        now=now,
    )


def preview(plan: Plan, count: int) -> list[Message]:
    """The first ``count`` sendable messages, rendered exactly as they will be sent."""
    messages: list[Message] = []
    for s in _vetted(plan):
        if len(messages) >= count:
            break
        if s.fatal is not None:
            raise InputError(s.fatal)
        r = s.recipient
        if r.skip_reason is None:
            messages.append(plan.composer.build(r, f"<preview.{r.row}@bulkmail.local>"))
    if not messages:
        raise InputError(f"{plan.source.description}: no recipients to preview")
    return messages


# --------------------------------------------------------------------------- running


def provider_factory(settings: Settings) -> Callable[[JobRecord], Provider]:
    """Build a job's transport from its recorded non-secret settings plus today's secrets."""

    def factory(job: JobRecord) -> Provider:
        merged = settings.with_provider_public(job.provider, job.provider_settings)
        return make_provider(job.provider, merged, data_dir=data_dir())

    return factory


def manager(
    store: JobStore,
    job_id: int,
    settings: Settings,
    *,
    on_event: Callable[[Event], None] | None = None,
    exclusive: bool = True,
    db_url: str | None = None,
) -> EmailManager:
    """``exclusive``: refuse a job that a live worker holds (``resume``); False adds this
    worker to the job's others (``bulkmail worker``, ``--workers N``). ``db_url``: the
    course database URL the job was just made from (--recheck: its password), tried before
    BULKMAIL_DB / ``db`` of the config."""
    return EmailManager(
        store,
        job_id,
        provider_factory=provider_factory(settings),
        on_event=on_event,
        exclusive=exclusive,
        throttle_pause=settings.throttle_pause or THROTTLE_PAUSE_AFTER,
        recheck_urls=[url for url in (db_url, settings.db) if url],
    )


def with_throttle_pause(settings: Settings, seconds: float | None) -> Settings:
    """``--throttle-pause SECONDS`` over BULKMAIL_THROTTLE_PAUSE and the config file."""
    if seconds is None:
        return settings
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"--throttle-pause: must be a positive number of seconds, got {seconds}")
    return replace(settings, throttle_pause=seconds)


def worker_env(settings: Settings, db_url: str | None = None) -> dict[str, str]:
    """What a detached worker needs in its environment that a flag gave this command: the
    throttle pause, and the course database URL (--recheck; with its password, so it goes
    through the environment, never the command line that every user can read)."""
    env: dict[str, str] = {}
    if settings.throttle_pause is not None:
        env["BULKMAIL_THROTTLE_PAUSE"] = repr(settings.throttle_pause)
    if db_url:
        env["BULKMAIL_DB"] = db_url
    return env


@dataclass(frozen=True)
class Detached:
    job_id: int
    pid: int
    log_path: str


def start_detached(
    store: JobStore,
    job_id: int,
    *,
    config: str | None,
    timeout: float = 20.0,
    exclusive: bool = True,
    env: Mapping[str, str] | None = None,
) -> Detached:
    """Start ``bulkmail worker JOB_ID`` in a new session (stdin closed, output to the job's
    log file, mode 0600) and return once it has registered on the job. ``exclusive``: the
    worker refuses a job that a live worker holds; False adds it to the job's workers.
    ``env``: more environment for the worker (``worker_env``).

    The store reaches the worker through ``BULKMAIL_STORE``, not the command line: a
    PostgreSQL URL may hold a password, and every user can read command lines."""
    logs = data_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    # the job's token keeps apart the logs of job N in two different stores
    log_path = logs / f"job-{job_id}-{store.get_job(job_id).token}.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    store.set_log_path(job_id, str(log_path))
    cmd = [sys.executable, "-m", "bulkmail", "worker", str(job_id)]
    if exclusive:
        cmd.append("--exclusive")
    if config:
        cmd += ["--config", str(Path(config).absolute())]
    try:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **(env or {}), "BULKMAIL_STORE": store.url},
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w.pid == proc.pid for w in store.view(job_id).workers):
            return Detached(job_id, proc.pid, str(log_path))
        code = proc.poll()
        if code == 0:
            return Detached(job_id, proc.pid, str(log_path))  # found nothing left to do
        if code is not None and not any(w.pid == proc.pid for w in store.view(job_id).workers):
            tail = _last_line(log_path)
            raise BulkmailError(f"the worker for job {job_id} exited ({code}): {tail}")
        time.sleep(0.05)
    raise BulkmailError(f"the worker for job {job_id} did not start; see {log_path}")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


# ------------------------------------------------- what resume, retry and worker decide


@dataclass(frozen=True)
class NothingToDo:
    """A command found nothing to run: the line to tell the user and the exit code."""

    view: JobView
    message: str
    exit_code: ExitCode = ExitCode.OK


FINISHED_STATES = (JobState.COMPLETED, JobState.CANCELLED)


def check_resume(store: JobStore, job_id: int) -> NothingToDo | None:
    """None when ``resume`` runs the job; a finished (completed or cancelled) job has
    nothing to resume, and reports the exit code its last run ended with."""
    view = store.view(job_id)
    state = view.job.state
    if state == JobState.CREATING:
        raise JobStateError(creating_refusal(job_id))
    if state not in FINISHED_STATES:
        return None
    return NothingToDo(
        view,
        f"job {job_id} is {state}; nothing to resume",
        exit_code_for(state, view.counts),
    )


def prepare_retry(store: JobStore, job_id: int, *, now: float | None = None) -> NothingToDo | int:
    """Put the job's failed deliveries back to pending and return how many, for ``retry``
    to run the job. A job a live worker runs is refused (JobStateError, exit 2); a
    completed job without failures has nothing to retry (exit 0)."""
    from bulkmail.documents import effective_state

    view = store.view(job_id)
    if effective_state(view, now=time.time() if now is None else now) == JobState.RUNNING:
        raise JobStateError(
            f"job {job_id} is being run by a worker; retry its failures once it has finished "
            f"(bulkmail status {job_id} --watch)"
        )
    if view.counts.failed == 0 and view.job.state == JobState.COMPLETED:
        return NothingToDo(view, f"job {job_id} has no failed deliveries; nothing to retry")
    return store.retry_failed(job_id)


def joined_too_late(store: JobStore, job_id: int, *, exclusive: bool) -> NothingToDo | None:
    """A worker was refused the job (JobStateError): when it came to join a job that the
    other workers have just finished, that is nothing to do, not an error (exit 0); None
    when the refusal stands (an exclusive worker, or a job that is not finished)."""
    view = store.view(job_id)
    state = view.job.state
    if exclusive or state not in FINISHED_STATES:
        return None
    return NothingToDo(view, f"job {job_id} is already {state}")


# --------------------------------------------------------------------------- run-due


@dataclass
class DueRun:
    """What ``run-due`` did: the workers it started, and the jobs it could not start."""

    started: list[Detached] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)


def run_due(
    store: JobStore,
    *,
    config: str | None,
    now: float | None = None,
    start: Callable[[int], Detached] | None = None,
    env: Mapping[str, str] | None = None,
) -> DueRun:
    """Start a detached worker for every job whose time has come (``store.due_jobs``) that
    no live worker holds. Safe to run every minute from several hosts: the worker
    registers exclusively, so of two started at once on one job the second is refused,
    and that job is skipped here, not reported. ``env``: more environment for the workers
    (``worker_env``)."""
    from bulkmail.documents import effective_state

    at = time.time() if now is None else now
    launch = start or (lambda job_id: start_detached(store, job_id, config=config, env=env))
    result = DueRun()
    for job_id in store.due_jobs(now=now):
        if effective_state(store.view(job_id), now=at) == JobState.RUNNING:
            continue  # a live worker holds it (it may be waiting for a window or a cap)
        try:
            result.started.append(launch(job_id))
        except BulkmailError as exc:
            view = store.view(job_id)
            if effective_state(view, now=time.time()) == JobState.RUNNING:
                continue  # another host's run-due started it first
            if view.job.state in FINISHED_STATES:
                continue
            result.errors.append((job_id, str(exc)))
    return result


# --------------------------------------------------------------------------- first run


def check(settings: Settings, provider: str | None = None, *, timeout: float | None = None) -> str:
    """``bulkmail check``: prove the provider can send (``providers.preflight``) and return
    what was proved, one line. ConfigError (exit 2) or PreflightError (exit 3)."""
    name = provider or settings.provider_name
    if name not in PROVIDERS:
        raise InputError(f"--provider: must be one of {', '.join(PROVIDERS)}, got {name!r}")
    settings = with_defaults(name, settings, data_dir=data_dir())
    check_provider(name, settings)
    return preflight(name, settings, data_dir=data_dir(), timeout=timeout)


def preflight_plan(plan: Plan, *, timeout: float | None = None) -> str:
    """The pre-flight check of the plan's provider, before any job exists."""
    return preflight(plan.provider, plan.settings, data_dir=data_dir(), timeout=timeout)


def already_reminded(plan: Plan, taken: Mapping[str, tuple[int, str]] | None) -> int:
    """How many recipients there are when every one the plan would send to is already
    taken under its --dedupe-key (a cron re-run with nothing new: no job is created); 0 when
    at least one is not (or there is no key, or nobody to send to at all)."""
    key = plan.send.dedupe_key
    if not key or not taken:
        return 0
    count = 0
    for s in plan.screened():
        r = s.recipient
        if s.fatal is not None:
            return 0  # the normal path reports it
        if r.skip_reason is not None:
            continue
        if r.email.lower() not in taken:
            return 0
        count += 1
    return count


@dataclass(frozen=True)
class TrialSent:
    """What ``--test-to`` sent: the source row it rendered and where it went."""

    row: int
    email: str  # the recipient whose message it is
    to: str  # where it went
    subject: str
    provider_id: str | None


TEST_PREFIX = "[TEST] "


def send_test(plan: Plan, to: str, *, row: int | None = None) -> TrialSent:
    """Send the first sendable recipient's message (or row ``row``'s) to ``to`` instead,
    subject prefixed "[TEST] ", without Cc or Bcc (the office gets no copy of a test), and
    record it nowhere: no job, no delivery. ``--test-to`` runs the pre-flight check first.
    InputError for a bad address or row, PreflightError (exit 3) when the provider refuses
    the message."""
    import secrets

    from bulkmail.compose import parse_address
    from bulkmail.errors import PreflightError
    from bulkmail.providers import ProviderError

    name, address = parse_address(to, "--test-to")
    chosen: Recipient | None = None
    for s in _vetted(plan):
        r = s.recipient
        if row is not None and r.row != row:
            continue
        if s.fatal is not None:
            raise InputError(s.fatal)
        if r.skip_reason is not None:
            if row is not None:
                raise InputError(
                    f"--test-row {row}: {r.email} is skipped ({r.skip_reason}); pick another row"
                )
            continue
        chosen = r
        break
    where = plan.source.description
    if chosen is None:
        if row is not None:
            raise InputError(f"--test-row {row}: {where} has no such row")
        raise InputError(f"{where}: no recipient to send a test for")
    domain = plan.composer.domain or "bulkmail.local"
    message = plan.composer.build(chosen, f"<test.{secrets.token_hex(8)}@{domain}>", origin=where)
    message = replace(
        message,
        to_email=address,
        to_name=name,
        subject=TEST_PREFIX + message.subject,
        cc=(),
        bcc=(),
    )
    provider = make_provider(plan.provider, plan.settings, data_dir=data_dir())
    try:
        sent_id = provider.send(message)
    except ProviderError as exc:
        raise PreflightError(f"the test message to {address} was not sent: {exc}") from None
    finally:
        provider.close()
    return TrialSent(chosen.row, chosen.email, address, message.subject, sent_id)
