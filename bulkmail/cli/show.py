"""The commands that read: status, recent, history, report. They use the light store reader and
do not import the send machinery (see the start-up benchmark)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, TextIO

import typer

from bulkmail.cli import app
from bulkmail.cli.common import (
    ConfigOpt,
    JobArg,
    JsonOpt,
    StoreOpt,
    handles_errors,
    open_reader_for,
    print_json,
    say,
)
from bulkmail.cli.env import environment
from bulkmail.errors import BulkmailError, InputError


@app.command()
@handles_errors
def status(
    job_id: JobArg,
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow the job live until it ends.")
    ] = False,
    failed: Annotated[bool, typer.Option("--failed", help="List failed deliveries.")] = False,
    skipped: Annotated[
        bool, typer.Option("--skipped", help="List skipped deliveries with the reason.")
    ] = False,
    bounced: Annotated[
        bool,
        typer.Option("--bounced", help="List bounces, rejects and complaints with the reason."),
    ] = False,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show a job's state and counts.

    Example:

    \b
      bulkmail status 1 --failed
    """
    from bulkmail import documents, ui

    env = environment()
    db = open_reader_for(store, config)
    doc = documents.job_document(db.view(job_id))
    if watch:
        doc = ui.watch(env.stderr, lambda: db.view(job_id), live=env.stderr_is_terminal)
    if failed:
        doc["failures"] = documents.failures(db, job_id)
    if skipped:
        doc["skips"] = documents.skips(db, job_id)
    if bounced:
        doc["bounces"] = documents.bounces(db, job_id)
    if as_json:
        print_json(doc)
        return
    out = env.stdout
    out.print(ui.status_panel(doc))
    table = ui.workers_table(doc)
    if table is not None:
        out.print(table)
    if failed:
        out.print(ui.failures_table(doc["failures"]))
    if skipped:
        out.print(ui.skips_table(doc["skips"]))
    if bounced:
        out.print(ui.bounces_table(doc["bounces"]))


@app.command()
@handles_errors
def history(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The email address (any case).")],
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Every delivery to an address across jobs: job, name, dedupe key, state, time.
    Example:

    \b
      bulkmail history ada@example.edu
    """
    from bulkmail import documents, ui

    docs = documents.history_documents(open_reader_for(store, config).history(address))
    out = environment().stdout
    if as_json:
        print_json(docs)
    elif not docs:
        out.print(f"no deliveries to {address}", markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(ui.history_table(address, docs))


@app.command()
@handles_errors
def recent(
    limit: Annotated[int, typer.Option("--limit", metavar="N", help="How many jobs.", min=1)] = 10,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List the newest jobs.

    Example:

    \b
      bulkmail recent --limit 5
    """
    from bulkmail import documents, ui

    docs = [documents.job_document(v) for v in open_reader_for(store, config).recent(limit)]
    out = environment().stdout
    if as_json:
        print_json(docs)
    elif not docs:
        out.print("no jobs yet", markup=False)
    else:
        out.print(ui.recent_table(docs))


@app.command()
@handles_errors
def report(
    job_id: JobArg,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="PATH", help="CSV file to write (default: stdout)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the rows as one JSON list on stdout instead of CSV."),
    ] = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Per-recipient outcomes as CSV (or JSON with --json).

    Example:

    \b
      bulkmail report 3 --output job3.csv
    """
    from bulkmail import documents

    env = environment()
    db = open_reader_for(store, config)
    if as_json:
        if output is not None:
            raise InputError("--json prints on stdout: leave out --output")
        print_json(documents.report_rows(db, job_id))
        return
    if output is None:
        try:
            documents.write_report(db, job_id, env.stdout.file)
            env.stdout.file.flush()
        except BrokenPipeError:
            raise  # `bulkmail report 1 | head`: click exits quietly
        except OSError as exc:
            raise BulkmailError(f"cannot write to standard output: {exc.strerror}") from None
        return
    db.get_job(job_id)  # an unknown job is exit 2 before an empty file is left behind
    try:
        with _private_file(output) as f:
            rows = documents.write_report(db, job_id, f)
    except OSError as exc:
        raise InputError(f"{output}: cannot write: {exc.strerror}") from None
    noun = "row" if rows == 1 else "rows"
    say(f"wrote {rows} {noun} to {output}")


def _private_file(path: Path) -> TextIO:
    """``path`` opened for writing text, emptied, readable by its owner only (0600): a report
    holds names and addresses. An existing file is made 0600 before it is emptied; anything
    but a regular file (a FIFO, ``/dev/stdout``) is written as it is, its mode untouched."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            if os.name == "posix":
                os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
        return open(fd, "w", encoding="utf-8", newline="")
    except BaseException:
        os.close(fd)
        raise
