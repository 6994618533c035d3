"""The commands that send: send-reminders, resume, retry, cancel, preview, worker."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from bulkmail.cli import app
from bulkmail.cli.common import (
    ConfigOpt,
    DetachOpt,
    JobArg,
    JsonOpt,
    StoreOpt,
    WorkersOpt,
    create_store_for,
    fail,
    handles_errors,
    load_config,
    no_dedupe_history,
    open_reader_for,
    open_store_for,
    print_json,
    say,
    say_new_store,
    setup_logging,
    utc_now,
    with_source_options,
)
from bulkmail.cli.env import Environment, environment
from bulkmail.errors import ExitCode, InputError, JobStateError, exit_code_of

if TYPE_CHECKING:  # loaded by the commands when they run: `--help` stays light
    from bulkmail.config import Settings
    from bulkmail.jobs import DryRun, NothingToDo, Plan, SourceOptions
    from bulkmail.manager import Event
    from bulkmail.store import JobStore


def _run_job(
    env: Environment,
    store: JobStore,
    job_id: int,
    settings: Settings,
    *,
    as_json: bool,
    detach: bool,
    config: str | None,
    workers: int = 1,
    db_url: str | None = None,
) -> None:
    """Run (or detach) a job and report the outcome with its exit code. ``db_url``: the
    course database URL the job was just made from (--recheck, password included)."""
    from bulkmail import documents, jobs, ui

    job = store.get_job(job_id)
    if job.state == "scheduled" and not detach:
        # created for later: cron's `bulkmail run-due` starts it when its time comes
        from bulkmail.schedule import parse_zone

        when = job.not_before or time.time()
        local = datetime.fromtimestamp(when, parse_zone(job.tz))
        if as_json:
            print_json(documents.job_document(store.view(job_id)))
        else:
            env.stdout.print(
                f"job {job_id} scheduled for {local:%Y-%m-%d %H:%M} {local.tzname()}; "
                "run `bulkmail run-due` from cron (or a systemd timer) to start it then, "
                f"or `bulkmail resume {job_id} --detach` to start a worker that waits",
                markup=False,
                highlight=False,
            )
        raise typer.Exit(0)
    if detach or workers > 1:
        # the first worker is exclusive (a job a live worker holds is refused, as for a
        # foreground resume); the others join it
        started = [
            jobs.start_detached(
                store,
                job_id,
                config=config,
                exclusive=n == 0,
                env=jobs.worker_env(settings, db_url),
            )
            for n in range(workers)
        ]
        pids = ", ".join(str(s.pid) for s in started)
        if as_json:
            doc = documents.job_document(store.view(job_id))
            doc["worker_pid"], doc["log_path"] = started[0].pid, started[0].log_path
            print_json(doc)
        else:
            env.stdout.print(
                f"job {job_id} started in the background: "
                f"worker pid{'s' if workers > 1 else ''} {pids}, "
                f"log {started[0].log_path}\nwatch it with: bulkmail status {job_id} --watch",
                markup=False,
                highlight=False,
            )
        raise typer.Exit(0)

    setup_logging(quiet=as_json)
    view = store.view(job_id)
    display = ui.RunDisplay(
        env.stderr,
        job_id=job_id,
        total=view.job.total,
        done=view.counts.done,
        failed=view.counts.failed,
        live=env.stderr_is_terminal and not as_json,
    )
    mgr = jobs.manager(store, job_id, settings, on_event=display.handle, db_url=db_url)
    with display.running():
        result = mgr.run()
        # deliveries the store settled without an event (skipped at claim time under a
        # --dedupe-key) count too: the bar ends at the store's numbers
        display.settle(result.counts)
    # a run that could not record its end (a store error) left the job `running` under
    # this very process: the summary says stalled, as the run's own line does
    gone = [mgr.worker_id] if result.state == "stalled" else []
    doc = documents.job_document(store.view(job_id), gone=gone)
    if as_json:
        print_json(doc)
    else:
        env.stdout.print(ui.summary(doc))
    if result.hint:
        say(result.hint)
    raise typer.Exit(int(result.exit_code))


def _nothing_to_do(env: Environment, nothing: NothingToDo, *, as_json: bool) -> None:
    """Report a job a command found nothing to run in: its document or the line why."""
    from bulkmail import documents

    if as_json:
        print_json(documents.job_document(nothing.view))
    else:
        env.stdout.print(nothing.message, markup=False)
    raise typer.Exit(int(nothing.exit_code))


def _warn_about_source(env: Environment, plan: Plan) -> None:
    """The source's warnings (e.g. a database role that can write), one line each."""
    for warning in plan.source.warnings:
        say(f"warning: {warning}")


CONFIRMATION_REQUIRED = "confirmation required: pass --yes (or --dry-run)"

ThrottlePauseOpt = Annotated[
    float | None,
    typer.Option(
        "--throttle-pause",
        metavar="SECONDS",
        help="Pause the job after this long with nothing but throttling replies from the "
        "server (default: throttle_pause in the config's [defaults] or "
        "BULKMAIL_THROTTLE_PAUSE, else 600).",
        show_default=False,
    ),
]

TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help="Seconds the pre-flight check waits to connect, for the greeting, TLS and "
        "login (default: the provider's timeout setting, at most 10).",
        show_default=False,
    ),
]


def _confirm(env: Environment, plan: Plan, summary: DryRun) -> bool:
    """Ask on a terminal only; --yes and non-terminals never ask."""
    from bulkmail import ui

    line = (
        f"Send {summary.to_send} reminders via {plan.provider} from {plan.sender} "
        f"({len(summary.skipped)} skipped{ui.empty_values_note(summary)})"
    )
    if plan.rate > 0 and summary.to_send > plan.burst:
        line += f", taking about {ui.duration(summary.estimated_seconds)} at {ui.rate(plan.rate)}"
        if summary.estimated_seconds > 600 and summary.calendar is None:
            line += "; --detach runs it in the background"
    env.note(line)
    if summary.calendar is not None:
        # the calendar decides when the job ends, not the rate alone
        env.note(f"calendar: {ui.calendar_line(summary.calendar)}")
        warning = ui.calendar_warning(summary.calendar)
        if warning:
            say(f"warning: {warning}")
        if summary.calendar.finishes_at is not None and (
            summary.calendar.finishes_at - summary.calendar.now > 600
        ):
            env.note("--detach runs it in the background")
    return env.confirm("Continue?")


@app.command("send-reminders")
@handles_errors
@with_source_options
def send_reminders(
    source: SourceOptions,
    provider: Annotated[
        str | None,
        typer.Option(
            "--provider",
            metavar="NAME",
            help="smtp | mailtrap | outbox (default: provider in the config's [defaults] "
            "or BULKMAIL_PROVIDER, else outbox).",
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            metavar="PER_SECOND",
            help="Emails per second; 0 = unlimited (default: rate in the config's [defaults] "
            "or BULKMAIL_RATE, else 0.1 for smtp and mailtrap, 0 for the outbox).",
        ),
    ] = None,
    burst: Annotated[
        int | None,
        typer.Option(
            "--burst",
            metavar="N",
            help="Token bucket capacity (default: burst in the config's [defaults] or "
            "BULKMAIL_BURST, else 1).",
        ),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency", metavar="N", help="Parallel connections, one shared rate limit."
        ),
    ] = 1,
    max_retries: Annotated[
        int, typer.Option("--max-retries", metavar="N", help="Retries of a transient failure.")
    ] = 3,
    backoff: Annotated[
        float,
        typer.Option(
            "--backoff", metavar="SECONDS", help="First retry delay in seconds, doubling."
        ),
    ] = 5.0,
    select: Annotated[
        bool, typer.Option("--select", help="Pick recipients from a numbered list (terminal).")
    ] = False,
    dedupe_key: Annotated[
        str | None,
        typer.Option(
            "--dedupe-key", metavar="KEY", help="Skip addresses already sent under this key (cron)."
        ),
    ] = None,
    per_hour: Annotated[
        int | None,
        typer.Option(
            "--per-hour",
            metavar="N",
            envvar="BULKMAIL_PER_HOUR",
            help="At most N emails in any hour on the account (default: per_hour in the "
            "provider's config section).",
            show_default=False,
        ),
    ] = None,
    per_day: Annotated[
        int | None,
        typer.Option(
            "--per-day",
            metavar="N",
            envvar="BULKMAIL_PER_DAY",
            help="At most N emails in any 24 hours on the account (default: per_day in the "
            "provider's config section).",
            show_default=False,
        ),
    ] = None,
    window: Annotated[
        list[str] | None,
        typer.Option(
            "--window",
            metavar="DAYS HH:MM-HH:MM",
            help='Send only in these hours, e.g. "Mon-Fri 08:00-18:00" (repeatable).',
        ),
    ] = None,
    tz: Annotated[
        str | None,
        typer.Option(
            "--tz",
            metavar="ZONE",
            help="Time zone of --window and --not-before/--not-after, "
            "e.g. Europe/Berlin (default: the local zone).",
            show_default=False,
        ),
    ] = None,
    not_before: Annotated[
        str | None,
        typer.Option(
            "--not-before",
            metavar="DATETIME",
            help="Send nothing before this ISO 8601 time, e.g. 2026-12-01T08:00 (in --tz).",
        ),
    ] = None,
    not_after: Annotated[
        str | None,
        typer.Option(
            "--not-after",
            metavar="DATETIME",
            help="Send nothing after this time; what is left then expires (a date: its end).",
        ),
    ] = None,
    recheck: Annotated[
        bool,
        typer.Option(
            "--recheck",
            help="With --db: run the query again before each send (at most once a minute) "
            "and skip the recipients it no longer returns.",
        ),
    ] = False,
    throttle_pause: ThrottlePauseOpt = None,
    include_suppressed: Annotated[
        bool,
        typer.Option(
            "--include-suppressed",
            help="Also send to addresses on the suppression list (bounced, complained, "
            "unsubscribed; see `bulkmail suppress list`).",
        ),
    ] = False,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="TEXT",
            help="A label for the job, shown by `recent` and `status` (default: the source's "
            "file or database name and the subject).",
            show_default=False,
        ),
    ] = None,
    test_to: Annotated[
        str | None,
        typer.Option(
            "--test-to",
            metavar="ADDR",
            help="Send the first recipient's message to ADDR instead, subject prefixed "
            "[TEST]; no job, nothing recorded.",
            show_default=False,
        ),
    ] = None,
    test_row: Annotated[
        int | None,
        typer.Option(
            "--test-row",
            metavar="N",
            help="With --test-to: the message of source row N (as --dry-run numbers rows).",
            show_default=False,
        ),
    ] = None,
    timeout: TimeoutOpt = None,
    new_store: Annotated[
        bool,
        typer.Option(
            "--new-store",
            help="Start a new job store if there is none at --store: needed with "
            "--dedupe-key, whose history a new store does not have.",
        ),
    ] = False,
    detach: DetachOpt = False,
    workers: WorkersOpt = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and summarise; send nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Create a reminder job from a CSV or the course DB and send it.

    Example:

    \b
      bulkmail send-reminders --csv examples/instructors.csv \\
        --template examples/reminder.txt --subject "Reminder: {{ course }}" --yes
    """
    from bulkmail import jobs, ui
    from bulkmail.store.readonly import NoStore

    env = environment()
    settings = jobs.with_throttle_pause(load_config(config), throttle_pause)
    plan = jobs.plan(
        source,
        jobs.SendOptions(
            provider=provider,
            rate=rate,
            burst=burst,
            concurrency=concurrency,
            max_retries=max_retries,
            backoff=backoff,
            dedupe_key=dedupe_key,
            windows=window or (),
            tz=tz,
            not_before=not_before,
            not_after=not_after,
            per_hour=per_hour,
            per_day=per_day,
            include_suppressed=include_suppressed,
            name=name,
            recheck=recheck,
        ),
        settings,
    )
    if test_row is not None and test_to is None:
        raise InputError("--test-row needs --test-to ADDR")
    if test_to is not None and (dry_run or detach or workers > 1):
        raise InputError(
            "--test-to sends one message now: not with --dry-run, --detach or --workers"
        )
    jobs.job_name(plan)  # a bad --name is refused before anything else happens
    _warn_about_source(env, plan)
    interactive = env.stdin_isatty
    if select and not interactive:
        raise InputError("--select needs a terminal; use --only/--exclude in scripts")
    if not (interactive or yes or dry_run or test_to is not None):
        # nothing is ever sent by accident from a script (as gh does)
        fail(CONFIRMATION_REQUIRED)
    if select:
        plan.chosen = ui.select_rows(env.stderr, list(plan.recipients()), ask=env.prompt)
    if test_to is not None:
        checked = jobs.preflight_plan(plan, timeout=timeout)
        sent = jobs.send_test(plan, test_to, row=test_row)
        env.stdout.print(
            f"test message sent to {sent.to} via {checked}: row {sent.row} ({sent.email}'s "
            f"message), subject {sent.subject!r}; no job created, nothing recorded",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(0)
    taken = None
    reader = open_reader_for(store, config, missing_ok=True)
    if plan.send.dedupe_key:
        if isinstance(reader, NoStore) and not new_store:
            raise no_dedupe_history(reader.location, plan.send.dedupe_key)
        taken = reader.taken_under(plan.send.dedupe_key)
    if not dry_run:
        reminded = jobs.already_reminded(plan, taken)
        if reminded:
            line = (
                f"nothing to send: all {reminded} recipients already reminded under dedupe "
                f"key {plan.send.dedupe_key!r}; no job created"
            )
            if as_json:
                print_json(
                    {
                        "id": None,
                        "state": "nothing to send",
                        "dedupe_key": plan.send.dedupe_key,
                        "already_reminded": reminded,
                        "message": line,
                    }
                )
            else:
                env.stdout.print(line, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(0)
        # the server, TLS and login (or the token, or the folder) proved within seconds,
        # before any job exists: a wrong server is one line and exit 3, not minutes
        checked = jobs.preflight_plan(plan, timeout=timeout)
        if not as_json and interactive and not yes:
            env.note(f"checked: {checked}")
    if dry_run or (interactive and not yes):
        suppressed = None
        if not include_suppressed:
            suppressed = {s.email.lower(): s for s in reader.suppressions()}
        history = jobs.account_history(reader, plan)
        summary = jobs.dry_run(plan, taken=taken, suppressed=suppressed, history=history)
        if dry_run:
            if as_json:
                print_json(ui.dry_run_document(summary))
            else:
                env.stdout.print(ui.dry_run_view(summary))
        if summary.refused:
            more = len(summary.refused) - 1
            fail(summary.refused[0][2] + (f" (and {more} more rows)" if more else ""))
        if summary.nothing_valid:
            fail(f"{summary.source}: no valid recipient; every row is skipped")
        if dry_run:
            raise typer.Exit(0)
        try:
            confirmed = _confirm(env, plan, summary)
        except KeyboardInterrupt as exc:  # Ctrl-C (or SIGTERM) at the question
            env.note("")  # off the prompt's line
            code = exit_code_of(exc) or ExitCode.INTERRUPTED
            fail("interrupted: nothing sent and no job created", code)
        if not confirmed:
            fail("nothing sent and no job created", ExitCode.OK)
    db_store, created = create_store_for(
        store, settings, dedupe_key=plan.send.dedupe_key, new_store=new_store
    )
    job_id = jobs.create_job(db_store, plan)
    if created:
        say_new_store(db_store.location)
    db_url = plan.recheck[0] if plan.recheck else None
    if db_url and not detach:
        _warn_about_recheck(db_store, job_id, settings)
    _run_job(
        env,
        db_store,
        job_id,
        settings,
        as_json=as_json,
        detach=detach,
        config=config,
        workers=workers,
        db_url=db_url,
    )


def _warn_about_recheck(store: JobStore, job_id: int, settings: Settings) -> None:
    """A job scheduled for later whose --recheck URL lost its password: `run-due` starts it
    without the password unless BULKMAIL_DB (or db in the config) gives it then."""
    from bulkmail.recheck import runtime_url

    job = store.get_job(job_id)
    if job.state != "scheduled" or job.recheck_url is None:
        return
    if runtime_url(job.recheck_url, [settings.db]) is None:
        say(
            f"warning: --recheck: the worker `run-due` starts for job {job_id} needs the "
            "database password: set BULKMAIL_DB (or db under [defaults] in the config file)"
        )


@app.command()
@handles_errors
def resume(
    job_id: JobArg,
    detach: DetachOpt = False,
    workers: WorkersOpt = 1,
    throttle_pause: ThrottlePauseOpt = None,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Continue a paused, aborted or stalled job.

    Example:

    \b
      bulkmail resume 3
    """
    from bulkmail import jobs

    env = environment()
    settings = jobs.with_throttle_pause(load_config(config), throttle_pause)
    db = open_store_for(store, settings)
    nothing = jobs.check_resume(db, job_id)
    if nothing is not None:
        _nothing_to_do(env, nothing, as_json=as_json)
    _run_job(
        env, db, job_id, settings, as_json=as_json, detach=detach, config=config, workers=workers
    )


@app.command()
@handles_errors
def cancel(
    job_id: JobArg, as_json: JsonOpt = False, store: StoreOpt = None, config: ConfigOpt = None
) -> None:
    """Cancel a job: pending deliveries are cancelled; a running worker stops.

    Example:

    \b
      bulkmail cancel 3
    """
    from bulkmail.liveness import this_host, worker_alive

    now, host = time.time(), this_host()
    db = open_store_for(store, load_config(config))
    count = db.cancel(job_id, now=now, alive=lambda w: worker_alive(w, now=now, host=host))
    if as_json:
        from bulkmail import documents

        print_json(documents.job_document(db.view(job_id)))
        return
    environment().stdout.print(
        f"job {job_id} cancelled: {count} pending deliveries will not be sent",
        markup=False,
        highlight=False,
    )


@app.command()
@handles_errors
def retry(
    job_id: JobArg,
    detach: DetachOpt = False,
    yes: Annotated[
        bool,
        typer.Option("--yes", "-y", help="Do not ask (required when stdin is not a terminal)."),
    ] = False,
    throttle_pause: ThrottlePauseOpt = None,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Put failed deliveries back to pending and run the job.

    Example:

    \b
      bulkmail retry 3 --yes
    """
    from bulkmail import jobs

    env = environment()
    settings = jobs.with_throttle_pause(load_config(config), throttle_pause)
    db = open_store_for(store, settings)
    if not (yes or env.stdin_isatty):
        fail(CONFIRMATION_REQUIRED)  # a new send: never by accident from a script
    count = jobs.prepare_retry(db, job_id)
    if not isinstance(count, int):
        _nothing_to_do(env, count, as_json=as_json)
    if not as_json:
        say(f"job {job_id}: {count} failed deliveries back to pending")
    _run_job(env, db, job_id, settings, as_json=as_json, detach=detach, config=config)


@app.command()
@handles_errors
@with_source_options
def preview(
    source: SourceOptions,
    provider: Annotated[
        str | None, typer.Option("--provider", metavar="NAME", help="As for sending.")
    ] = None,
    count: Annotated[
        int, typer.Option("--count", metavar="N", help="How many messages.", min=1)
    ] = 3,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Render the first messages as they will be sent; sends and creates nothing.

    Example:

    \b
      bulkmail preview --csv examples/instructors.csv --template examples/reminder.txt \\
        --subject "Reminder: {{ course }}" --count 2
    """
    from bulkmail import jobs, ui

    plan = jobs.plan(source, jobs.SendOptions(provider=provider), load_config(config))
    _warn_about_source(environment(), plan)
    out = environment().stdout
    for n, message in enumerate(jobs.preview(plan, count), 1):
        out.print(ui.message_panel(message, n))


@app.command(hidden=False)
@handles_errors
def worker(
    job_id: JobArg,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    exclusive: Annotated[
        bool,
        typer.Option("--exclusive", hidden=True, help="Refuse a job a live worker holds."),
    ] = False,
    throttle_pause: ThrottlePauseOpt = None,
) -> None:
    """Run a job's send loop headless: what --detach starts, and how more workers join a
    job, on this host or others sharing a PostgreSQL store.

    Example:

    \b
      bulkmail worker 3 --store postgresql://bulkmail@db.example.edu/bulkmail
    """
    from bulkmail import jobs
    from bulkmail.cli import handle_sigterm

    handle_sigterm()  # (already, when run as `bulkmail`): SIGTERM is handled as Ctrl-C
    env = environment()
    settings = jobs.with_throttle_pause(load_config(config), throttle_pause)
    db = open_store_for(store, settings)
    setup_logging(timestamps=True)
    log = logging.getLogger("bulkmail")
    log.setLevel(logging.INFO)
    me = f"worker pid {os.getpid()}"
    env.write(f"{utc_now()} {me} starting job {job_id}\n")

    def on_event(event: Event) -> None:
        if event.kind in ("sent", "failed", "retry"):
            suffix = f": {event.error}" if event.error else ""
            env.write(f"{utc_now()} {event.kind} {event.email}{suffix}\n")

    try:
        result = jobs.manager(db, job_id, settings, on_event=on_event, exclusive=exclusive).run()
    except JobStateError:
        nothing = jobs.joined_too_late(db, job_id, exclusive=exclusive)
        if nothing is None:
            raise
        env.write(f"{utc_now()} {me}: {nothing.message}\n")
        raise typer.Exit(int(nothing.exit_code)) from None
    error = f" ({result.error})" if result.error else ""
    env.write(f"{utc_now()} {me} stopped: job {job_id} {result.state}{error}\n")
    raise typer.Exit(int(result.exit_code))


@app.command("run-due")
@handles_errors
def run_due(
    throttle_pause: ThrottlePauseOpt = None,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Start a background worker for every job whose time has come and that no live worker
    holds (scheduled with --not-before passed, queued, or stalled). For cron or a systemd
    timer: quiet when nothing is due, safe every minute and from several hosts.
    Example (a crontab line runs it every minute):

    \b
      bulkmail run-due --store /srv/bulkmail/jobs.db
    """
    from bulkmail import jobs

    env = environment()
    settings = jobs.with_throttle_pause(load_config(config), throttle_pause)
    db = open_store_for(store, settings)
    result = jobs.run_due(db, config=config, env=jobs.worker_env(settings))
    if as_json:
        print_json(
            {
                "started": [
                    {"id": s.job_id, "pid": s.pid, "log_path": s.log_path} for s in result.started
                ],
                "errors": [{"id": job_id, "error": error} for job_id, error in result.errors],
            }
        )
    else:
        for s in result.started:
            env.stdout.print(
                f"job {s.job_id} started: worker pid {s.pid}, log {s.log_path}",
                markup=False,
                highlight=False,
            )
        for job_id, error in result.errors:
            env.stderr.print(
                f"bulkmail: job {job_id} not started: {error}", markup=False, highlight=False
            )
    raise typer.Exit(int(ExitCode.SOME_FAILED if result.errors else ExitCode.OK))


@app.command()
@handles_errors
def check(
    provider: Annotated[
        str | None,
        typer.Option(
            "--provider",
            metavar="NAME",
            help="smtp | mailtrap | outbox (default: config, else outbox).",
        ),
    ] = None,
    timeout: TimeoutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Prove the provider can send, in seconds, sending nothing: SMTP connect, greeting,
    TLS and login; Mailtrap the token; outbox the folder. Exit 3 naming host, port and what
    went wrong, 2 for bad settings.

    Example:

    \b
      bulkmail check --timeout 5
    """
    from bulkmail import jobs

    checked = jobs.check(load_config(config), provider, timeout=timeout)
    environment().stdout.print(f"ok: {checked}", markup=False, highlight=False, soft_wrap=True)
