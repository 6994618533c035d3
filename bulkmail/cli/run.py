"""The commands that send: send-reminders, resume, retry, cancel, preview, worker."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bulkmail.cli import app
from bulkmail.cli.common import (
    AttachOpt,
    ConfigOpt,
    CsvOpt,
    DbOpt,
    DetachOpt,
    ExcludeOpt,
    FromOpt,
    HtmlOpt,
    JobArg,
    JsonOpt,
    OnlyOpt,
    QueryOpt,
    StoreOpt,
    SubjectOpt,
    TemplateOpt,
    WorkersOpt,
    err_console,
    fail,
    handles_errors,
    load_config,
    open_reader_for,
    open_store_for,
    print_json,
    setup_logging,
)
from bulkmail.errors import ExitCode, InputError, JobStateError


def _run_job(
    store: Any,
    job_id: int,
    settings: Any,
    *,
    as_json: bool,
    detach: bool,
    config: str | None,
    workers: int = 1,
) -> None:
    """Run (or detach) a job and report the outcome with the design's exit code."""
    from bulkmail import jobs, ui, views

    out = Console()
    if detach or workers > 1:
        # the first worker is exclusive (a job a live worker holds is refused, as for a
        # foreground resume); the others join it
        started = [
            jobs.start_detached(store, job_id, config=config, exclusive=n == 0)
            for n in range(workers)
        ]
        pids = ", ".join(str(s.pid) for s in started)
        if as_json:
            doc = views.job_document(store.view(job_id))
            doc.update(worker_pid=started[0].pid, log_path=started[0].log_path)
            print_json(doc)
        else:
            out.print(
                f"job {job_id} started in the background: "
                f"worker pid{'s' if workers > 1 else ''} {pids}, "
                f"log {started[0].log_path}\nwatch it with: bulkmail status {job_id} --watch",
                markup=False,
                highlight=False,
            )
        raise typer.Exit(0)

    setup_logging(quiet=as_json)
    view = store.view(job_id)
    c = view.counts
    err = err_console()
    display = ui.RunDisplay(
        err,
        job_id=job_id,
        total=view.job.total,
        done=c.sent + c.failed + c.skipped + c.cancelled,
        failed=c.failed,
        live=err.is_terminal and not as_json,
    )
    mgr = jobs.manager(store, job_id, settings, on_event=display.handle)
    with display.running():
        result = mgr.run()
    doc = views.job_document(store.view(job_id))
    if as_json:
        print_json(doc)
    else:
        out.print(ui.summary(doc))
    if result.interrupted:
        err.print(
            f"interrupted: job {job_id} paused; continue with: bulkmail resume {job_id}",
            markup=False,
            highlight=False,
        )
    elif result.state in ("paused", "aborted", "stalled"):
        err.print(
            f"job {job_id} {result.state}: {result.error}; "
            f"after fixing it: bulkmail resume {job_id}",
            markup=False,
            highlight=False,
        )
    raise typer.Exit(int(result.exit_code))


def _source_options(
    csv: Path | None,
    db: str | None,
    query: str | None,
    template: Path,
    html_template: Path | None,
    subject: str,
    attach: list[str] | None,
    sender: str | None,
    only: list[str] | None,
    exclude: list[str] | None,
) -> Any:
    """The source and template options shared by send-reminders and preview."""
    from bulkmail import jobs

    return jobs.SourceOptions(
        csv=str(csv) if csv else None,
        db=db,
        query=query,
        template=str(template),
        html_template=str(html_template) if html_template else None,
        subject=subject,
        attach=attach or (),
        sender=sender,
        only=only or (),
        exclude=exclude or (),
    )


def _warn_about_source(plan: Any) -> None:
    """The source's warnings (e.g. a database role that can write), one line each."""
    for warning in plan.source.warnings:
        err_console().print(
            f"bulkmail: warning: {warning}", markup=False, highlight=False, soft_wrap=True
        )


def _confirm(plan: Any, summary: Any) -> bool:
    """Ask on a terminal only; --yes and non-terminals never ask."""
    from bulkmail import ui

    line = (
        f"Send {summary.to_send} reminders via {plan.provider} from {plan.sender} "
        f"({len(summary.skipped)} skipped)"
    )
    if plan.rate > 0 and summary.to_send > plan.burst:
        line += f", taking about {ui.duration(summary.estimated_seconds)} at {ui.rate(plan.rate)}"
        if summary.estimated_seconds > 600:
            line += "; --detach runs it in the background"
    err_console().print(line, markup=False, highlight=False)
    return typer.confirm("Continue?", default=False, err=True)


@app.command("send-reminders")
@handles_errors
def send_reminders(
    template: TemplateOpt,
    subject: SubjectOpt,
    csv: CsvOpt = None,
    db: DbOpt = None,
    query: QueryOpt = None,
    html_template: HtmlOpt = None,
    attach: AttachOpt = None,
    sender: FromOpt = None,
    provider: Annotated[
        str | None,
        typer.Option(
            "--provider",
            metavar="NAME",
            help="smtp | mailtrap | outbox (default: config, else outbox).",
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option("--rate", metavar="PER_SECOND", help="Emails per second; 0 = unlimited."),
    ] = None,
    burst: Annotated[
        int | None, typer.Option("--burst", metavar="N", help="Token bucket capacity.")
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
    only: OnlyOpt = None,
    exclude: ExcludeOpt = None,
    select: Annotated[
        bool, typer.Option("--select", help="Pick recipients from a numbered list (terminal).")
    ] = False,
    dedupe_key: Annotated[
        str | None,
        typer.Option(
            "--dedupe-key", metavar="KEY", help="Skip addresses already sent under this key (cron)."
        ),
    ] = None,
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

    Example: bulkmail send-reminders --csv examples/instructors.csv
    --template examples/reminder.txt --subject "Reminder: {{ course }}" --yes
    """
    from bulkmail import jobs, ui

    settings = load_config(config)
    plan = jobs.plan(
        _source_options(
            csv, db, query, template, html_template, subject, attach, sender, only, exclude
        ),
        jobs.SendOptions(
            provider=provider,
            rate=rate,
            burst=burst,
            concurrency=concurrency,
            max_retries=max_retries,
            backoff=backoff,
            dedupe_key=dedupe_key,
        ),
        settings,
    )
    _warn_about_source(plan)
    interactive = sys.stdin.isatty()
    if select:
        if not interactive:
            raise InputError("--select needs a terminal; use --only/--exclude in scripts")
        plan.chosen = ui.select_rows(err_console(), list(plan.recipients()))
    if dry_run or (interactive and not yes):
        taken = None
        if plan.send.dedupe_key:
            taken = open_reader_for(store, config).taken_under(plan.send.dedupe_key)
        summary = jobs.dry_run(plan, taken=taken)
        if dry_run:
            if as_json:
                print_json(ui.dry_run_document(summary))
            else:
                Console().print(ui.dry_run_view(summary))
        if summary.nothing_valid:
            fail(f"{summary.source}: no valid recipient; every row is skipped")
        if dry_run:
            raise typer.Exit(0)
        if not _confirm(plan, summary):
            fail("nothing sent and no job created", ExitCode.OK)
    db_store = open_store_for(store, settings)
    job_id = jobs.create_job(db_store, plan)
    _run_job(
        db_store, job_id, settings, as_json=as_json, detach=detach, config=config, workers=workers
    )


@app.command()
@handles_errors
def resume(
    job_id: JobArg,
    detach: DetachOpt = False,
    workers: WorkersOpt = 1,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Continue a paused, aborted or stalled job.  Example: bulkmail resume 3"""
    settings = load_config(config)
    db = open_store_for(store, settings)
    job = db.get_job(job_id)
    if job.state in ("completed", "cancelled"):
        from bulkmail import jobs, views

        view = db.view(job_id)
        if as_json:
            print_json(views.job_document(view))
        else:
            Console().print(f"job {job_id} is {job.state}; nothing to resume", markup=False)
        raise typer.Exit(int(jobs.exit_code_of(view)))
    _run_job(db, job_id, settings, as_json=as_json, detach=detach, config=config, workers=workers)


@app.command()
@handles_errors
def cancel(job_id: JobArg, store: StoreOpt = None, config: ConfigOpt = None) -> None:
    """Cancel a job: pending deliveries are cancelled; a running worker stops.
    Example: bulkmail cancel 3"""
    from bulkmail.procs import this_host, worker_alive

    now, host = time.time(), this_host()
    count = open_store_for(store, load_config(config)).cancel(
        job_id, now=now, alive=lambda w: worker_alive(w, now=now, host=host)
    )
    Console().print(
        f"job {job_id} cancelled: {count} pending deliveries will not be sent",
        markup=False,
        highlight=False,
    )


@app.command()
@handles_errors
def retry(
    job_id: JobArg,
    detach: DetachOpt = False,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Put failed deliveries back to pending and run the job.  Example: bulkmail retry 3"""
    from bulkmail import views

    settings = load_config(config)
    db = open_store_for(store, settings)
    view = db.view(job_id)
    if views.effective_state(view, now=time.time()) == "running":
        raise JobStateError(
            f"job {job_id} is being run by a worker; retry its failures once it has finished "
            f"(bulkmail status {job_id} --watch)"
        )
    if view.counts.failed == 0 and view.job.state == "completed":
        if as_json:
            print_json(views.job_document(view))
        else:
            Console().print(f"job {job_id} has no failed deliveries; nothing to retry")
        raise typer.Exit(0)
    count = db.retry_failed(job_id)
    if not as_json:
        err_console().print(
            f"job {job_id}: {count} failed deliveries back to pending",
            markup=False,
            highlight=False,
        )
    _run_job(db, job_id, settings, as_json=as_json, detach=detach, config=config)


@app.command()
@handles_errors
def preview(
    template: TemplateOpt,
    subject: SubjectOpt,
    csv: CsvOpt = None,
    db: DbOpt = None,
    query: QueryOpt = None,
    html_template: HtmlOpt = None,
    attach: AttachOpt = None,
    sender: FromOpt = None,
    provider: Annotated[
        str | None, typer.Option("--provider", metavar="NAME", help="As for sending.")
    ] = None,
    only: OnlyOpt = None,
    exclude: ExcludeOpt = None,
    count: Annotated[
        int, typer.Option("--count", metavar="N", help="How many messages.", min=1)
    ] = 3,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Render the first messages as they will be sent; sends and creates nothing.
    Example: bulkmail preview --csv examples/instructors.csv --template examples/reminder.txt
    --subject "Reminder: {{ course }}" --count 2"""
    from bulkmail import jobs, ui

    settings = load_config(config)
    plan = jobs.plan(
        _source_options(
            csv, db, query, template, html_template, subject, attach, sender, only, exclude
        ),
        jobs.SendOptions(provider=provider),
        settings,
    )
    _warn_about_source(plan)
    out = Console()
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
) -> None:
    """Run a job's send loop headless: what --detach starts, and how more workers join a
    job, on this host or others sharing a PostgreSQL store.
    Example: bulkmail worker 3 --store postgresql://bulkmail@db.example.edu/bulkmail"""
    from bulkmail import jobs

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    settings = load_config(config)
    db = open_store_for(store, settings)
    setup_logging()
    log = logging.getLogger("bulkmail")
    log.setLevel(logging.INFO)
    print(f"worker pid {os.getpid()} starting job {job_id}", flush=True)

    def on_event(event: Any) -> None:
        if event.kind in ("sent", "failed", "retry"):
            suffix = f": {event.error}" if event.error else ""
            print(
                f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {event.kind} {event.email}{suffix}",
                flush=True,
            )

    try:
        result = jobs.manager(db, job_id, settings, on_event=on_event, exclusive=exclusive).run()
    except JobStateError:
        state = db.get_job(job_id).state
        if exclusive or state not in ("completed", "cancelled"):
            raise
        # a worker joining a job the others have just finished: nothing to do, not an error
        print(f"worker pid {os.getpid()}: job {job_id} is already {state}", flush=True)
        raise typer.Exit(0) from None
    print(
        f"worker pid {os.getpid()} stopped: job {job_id} {result.state}"
        + (f" ({result.error})" if result.error else ""),
        flush=True,
    )
    raise typer.Exit(int(result.exit_code))
