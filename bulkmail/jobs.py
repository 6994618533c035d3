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
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path

from bulkmail.compose import Composer, Templates
from bulkmail.config import PROVIDERS, Settings
from bulkmail.errors import BulkmailError, ExitCode, InputError, JobStateError, exit_code_for
from bulkmail.manager import EmailManager, Event
from bulkmail.models import Message, Recipient
from bulkmail.providers import (
    Provider,
    account_key,
    check_provider,
    make_provider,
    with_defaults,
)
from bulkmail.schedule import Calendar, Timing, plan_calendar, timing
from bulkmail.sources import Source, open_csv, open_db, select
from bulkmail.store import (
    JobRecord,
    JobState,
    JobStore,
    JobView,
    NewDelivery,
    NewJob,
    dedupe_reason,
)


def data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("bulkmail"))


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class SourceOptions:
    csv: str | None = None
    db: str | None = None
    query: str | None = None
    template: str = ""
    html_template: str | None = None
    subject: str = ""
    attach: Sequence[str] = ()
    sender: str | None = None
    only: Sequence[str] = ()
    exclude: Sequence[str] = ()


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
    # windows, zone, --not-before/--not-after (POSIX seconds) and the caps, checked
    timing: Timing = field(default_factory=Timing)

    def recipients(self) -> Iterator[Recipient]:
        rows = select(self.source, self.only, self.exclude)
        if self.chosen is None:
            return rows
        chosen = self.chosen
        return (r for r in rows if r.row in chosen)


def open_source(opts: SourceOptions) -> Source:
    if bool(opts.csv) == bool(opts.db):
        raise InputError("give exactly one recipient source: --csv PATH or --db URL")
    if opts.query and not opts.db:
        raise InputError("--query needs --db URL")
    if opts.csv:
        return open_csv(opts.csv)
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
    when = plan_timing(send, settings, provider, now=time.time() if now is None else now)
    settings = with_defaults(provider, settings, data_dir=data_dir())
    check_provider(provider, settings)
    sender = opts.sender or settings.sender_for(provider)
    templates = Templates.load(
        subject=opts.subject,
        text_path=opts.template,
        html_path=opts.html_template,
        attach=opts.attach,
    )
    composer = Composer(templates, sender=sender)
    source = open_source(opts)
    source.header_columns = frozenset(composer.header_variables)  # CR/LF fine in the others
    available = {*source.columns, "name", "email", "row"}
    missing = sorted(composer.variables - available)
    if missing:
        raise InputError(
            f"{source.description}: template uses {', '.join(repr(m) for m in missing)} "
            f"but the source has no such column (columns: {', '.join(source.columns)})"
        )
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
        timing=when,
    )


def _checked(plan: Plan, *, require_sendable: bool = True) -> Iterator[Recipient]:
    """The plan's recipients, each rendered once as it will be sent (exit 2 on the first
    template problem). Raises at the end when there is nobody to send to: no rows at all,
    or only rows that are skipped (invalid addresses, duplicates...): a job of nothing but
    skips is a mistake in the list, not a job. (Skips by --dedupe-key come later, in the
    store: a cron re-run that finds everyone already reminded is fine.)"""
    count = sendable = 0
    first_skip: Recipient | None = None
    for r in plan.recipients():
        if r.skip_reason is None:
            plan.composer.check(r, plan.source.description)
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


def create_job(store: JobStore, plan: Plan, *, now: float | None = None) -> int:
    """Create the job and its deliveries in one transaction (nothing is left behind when a
    row or template fails)."""
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
    )
    rows = (NewDelivery(r.row, r.email, r.name, r.fields, r.skip_reason) for r in _checked(plan))
    domain = parseaddr(plan.sender)[1].rpartition("@")[2] or "bulkmail.local"
    return store.create_job(new, rows, now=time.time() if now is None else now, domain=domain)


@dataclass
class DryRun:
    source: str
    provider: str
    rate: float
    burst: int
    to_send: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # row, email, reason
    deduped: int = 0  # of the skipped: already sent under the --dedupe-key
    calendar: Calendar | None = None  # when any cap, window or --not-before/after is given

    @property
    def nothing_valid(self) -> bool:
        """Nobody to send to, and not because everyone was already reminded (exit 2)."""
        return self.to_send == 0 and self.deduped == 0

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
) -> DryRun:
    """Validate and render everything as ``create_job`` would, and create nothing.

    ``taken``: the addresses other jobs under the plan's ``--dedupe-key`` have sent or hold
    (``Store.taken_under``), shown as the skips the real run will make. With any of the
    caps, windows, --not-before or --not-after, the result has the job's calendar from
    ``now`` (default: the clock), assuming the account sent nothing in the last day."""
    result = DryRun(plan.source.description, plan.provider, plan.rate, plan.burst)
    key = plan.send.dedupe_key
    for r in _checked(plan, require_sendable=False):
        held = taken.get(r.email.lower()) if taken and key else None
        if r.skip_reason:
            result.skipped.append((r.row, r.email, r.skip_reason))
        elif key and held is not None:
            result.skipped.append((r.row, r.email, dedupe_reason(key, *held)))
            result.deduped += 1
        else:
            result.to_send += 1
    if plan.timing.active:
        result.calendar = calendar(plan, result.to_send, now=time.time() if now is None else now)
    return result


def calendar(plan: Plan, count: int, *, now: float, history: Sequence[float] = ()) -> Calendar:
    """When ``count`` messages of the plan go out, starting at ``now`` or --not-before,
    under its rate, caps, windows and --not-after; ``history``: the account's recent sends
    (the store's, once it records them per account)."""
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
    for r in plan.recipients():
        if len(messages) >= count:
            break
        if r.skip_reason is None:
            plan.composer.check(r, plan.source.description)
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
) -> EmailManager:
    """``exclusive``: refuse a job that a live worker holds (``resume``); False adds this
    worker to the job's others (``bulkmail worker``, ``--workers N``)."""
    return EmailManager(
        store,
        job_id,
        provider_factory=provider_factory(settings),
        on_event=on_event,
        exclusive=exclusive,
    )


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
) -> Detached:
    """Start ``bulkmail worker JOB_ID`` in a new session (stdin closed, output to the job's
    log file, mode 0600) and return once it has registered on the job. ``exclusive``: the
    worker refuses a job that a live worker holds; False adds it to the job's workers.

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
            env={**os.environ, "BULKMAIL_STORE": store.url},
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
    from bulkmail.views import effective_state

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
