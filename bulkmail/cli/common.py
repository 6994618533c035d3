"""Options shared by the commands (each defined once, the source and template options as
one signature) and the helpers every command uses: settings, the store, JSON output, and
the one place that turns domain errors into a line on stderr and their exit code."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Concatenate, NoReturn, ParamSpec, TypeVar

import typer

from bulkmail.cli.env import environment
from bulkmail.errors import BulkmailError, ExitCode, StoreError, exit_code_of

if TYPE_CHECKING:  # the commands import these on first use: `--help` stays light
    from bulkmail.config import Settings
    from bulkmail.jobs import SourceOptions
    from bulkmail.store import JobStore
    from bulkmail.store.contract import StoreReader

# -- shared options, defined once

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        metavar="PATH|URL",
        envvar="BULKMAIL_STORE",
        help="Job store: a path or SQLAlchemy URL (default: bulkmail.db in the user data dir).",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        metavar="PATH",
        envvar="BULKMAIL_CONFIG",
        help="TOML config file.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
DetachOpt = Annotated[
    bool, typer.Option("--detach", help="Run in a background worker and return at once.")
]
JobArg = Annotated[
    int, typer.Argument(metavar="JOB_ID", help="The job id (see `bulkmail recent`).", min=1)
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers",
        metavar="N",
        min=1,
        help="Run the job in N background workers on this host (implies --detach); "
        "more can join from other hosts with `bulkmail worker JOB_ID`.",
    ),
]

CsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--csv",
        metavar="PATH",
        help="CSV file of recipients (email, name, ...), delimited by , ; tab or |.",
    ),
]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db", metavar="URL", help="Course database: any SQLAlchemy URL.", show_default=False
    ),
]
QueryOpt = Annotated[
    str | None,
    typer.Option(
        "--query",
        metavar="SQL",
        help="SELECT for --db (default: SELECT name, email FROM instructors).",
    ),
]
XlsxOpt = Annotated[
    Path | None,
    typer.Option(
        "--xlsx",
        metavar="PATH",
        help="Excel workbook (.xlsx) of recipients: a header row, then one row each.",
        show_default=False,
    ),
]
SheetOpt = Annotated[
    str | None,
    typer.Option(
        "--sheet",
        metavar="NAME",
        help="The workbook's sheet to read (default: the first).",
        show_default=False,
    ),
]
EncodingOpt = Annotated[
    str | None,
    typer.Option(
        "--encoding",
        metavar="NAME",
        help="The CSV's encoding, e.g. cp1252 (what Excel on Windows writes) "
        "(default: UTF-8, with or without a BOM).",
        show_default=False,
    ),
]
OnEmptyOpt = Annotated[
    str | None,
    typer.Option(
        "--on-empty",
        metavar="skip|fail|send",
        help="A row whose value a template prints is empty: skip the row (recorded with "
        "the reason), fail (exit 2, nothing sent) or send anyway. Default: fail when the "
        "subject prints it, else skip. An empty subject or body is never sent.",
        show_default=False,
    ),
]
TemplateOpt = Annotated[
    Path, typer.Option("--template", metavar="PATH", help="Text body template (Jinja2).")
]
HtmlOpt = Annotated[
    Path | None,
    typer.Option("--html-template", metavar="PATH", help="HTML body template (autoescaped)."),
]
SubjectOpt = Annotated[
    str, typer.Option("--subject", metavar="TEXT", help="Subject template (Jinja2).")
]
AttachOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--attach", metavar="PATH", help="Attachment path, may be a template (repeatable)."
    ),
]
FromOpt = Annotated[
    str | None,
    typer.Option(
        "--from", metavar="ADDR", envvar="BULKMAIL_FROM", help="Sender, e.g. 'Office <o@x.edu>'."
    ),
]
OnlyOpt = Annotated[
    list[str] | None,
    typer.Option("--only", metavar="EMAIL", help="Send only to this address (repeatable)."),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", metavar="EMAIL", help="Leave this address out (repeatable)."),
]

ReplyToOpt = Annotated[
    str | None,
    typer.Option(
        "--reply-to",
        metavar="ADDR",
        help="Reply-To of every message (default: reply_to under [defaults]).",
        show_default=False,
    ),
]
CcOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--cc",
        metavar="ADDR",
        help="A copy of every message to ADDR, e.g. the office (repeatable; default: cc "
        "under [defaults]).",
        show_default=False,
    ),
]
BccOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--bcc",
        metavar="ADDR",
        help="A blind copy of every message to ADDR (repeatable; default: bcc under [defaults]).",
        show_default=False,
    ),
]
HeaderOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--header",
        metavar="NAME:VALUE",
        help="An extra header on every message (repeatable). Every message carries "
        "Auto-Submitted: auto-generated and X-Auto-Response-Suppress: OOF, AutoReply "
        "unless a --header of that name replaces it.",
        show_default=False,
    ),
]

P = ParamSpec("P")
T = TypeVar("T")


def source_options(
    template: TemplateOpt,
    subject: SubjectOpt,
    csv: CsvOpt = None,
    db: DbOpt = None,
    query: QueryOpt = None,
    html_template: HtmlOpt = None,
    attach: AttachOpt = None,
    sender: FromOpt = None,
    only: OnlyOpt = None,
    exclude: ExcludeOpt = None,
    xlsx: XlsxOpt = None,
    sheet: SheetOpt = None,
    encoding: EncodingOpt = None,
    on_empty: OnEmptyOpt = None,
    reply_to: ReplyToOpt = None,
    cc: CcOpt = None,
    bcc: BccOpt = None,
    header: HeaderOpt = None,
) -> SourceOptions:
    """The source and template options of send-reminders and preview, defined once: this
    signature is spliced into each command's by ``with_source_options``."""
    from bulkmail.jobs import SourceOptions

    return SourceOptions(
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
        xlsx=str(xlsx) if xlsx else None,
        sheet=sheet,
        encoding=encoding,
        on_empty=on_empty,
        reply_to=reply_to,
        cc=cc or None,
        bcc=bcc or None,
        headers=header or (),
    )


def _parameters(fn: Callable[..., object], *, skip: int = 0) -> list[inspect.Parameter]:
    """``fn``'s parameters (after the first ``skip``) with their annotations evaluated (this
    package writes them as strings), as Typer reads them."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return [
        p.replace(annotation=eval(p.annotation, fn.__globals__))
        if isinstance(p.annotation, str)
        else p
        for p in params
    ]


_SOURCE_PARAMS = _parameters(source_options)


def with_source_options(
    command: Callable[Concatenate[SourceOptions, P], T],
) -> Callable[P, T]:
    """Give ``command`` (whose first parameter is ``source``) the options of
    ``source_options`` in its place: Typer sees them as the command's own options, and the
    command receives them as one ``SourceOptions``."""
    if next(iter(inspect.signature(command).parameters), None) != "source":
        raise TypeError(f"{command.__name__}: the first parameter must be `source`")
    names = [p.name for p in _SOURCE_PARAMS]

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        picked = {name: kwargs.pop(name) for name in names if name in kwargs}
        return command(source_options(**picked), *args, **kwargs)  # type: ignore[arg-type]

    params = [*_SOURCE_PARAMS, *_parameters(command, skip=1)]
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def say(message: str) -> None:
    """One message on stderr, as every one there: ``bulkmail: message``, never wrapped."""
    environment().stderr.print(
        f"bulkmail: {message}", markup=False, highlight=False, soft_wrap=True
    )


def fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    say(message)
    raise typer.Exit(int(code))


def handles_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn domain errors into one line on stderr and their exit code (``exit_code_of``);
    Ctrl-C or SIGTERM outside a run (which handles its own) into "interrupted", 130 or 143."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except BulkmailError as exc:
            fail(exc.message, exit_code_of(exc) or ExitCode.BAD_INPUT)
        except KeyboardInterrupt as exc:
            fail("interrupted", exit_code_of(exc) or ExitCode.INTERRUPTED)

    return wrapper


def load_config(config: str | None) -> Settings:
    from bulkmail.config import load_settings

    settings = load_settings(config=config)
    for warning in settings.warnings:
        say(f"warning: {warning}")
    return settings


def open_store_for(
    store: str | None, settings: Settings | None = None, *, if_missing: str = ""
) -> JobStore:
    """The store at ``--store`` (else the config's, else the default file). It must exist:
    a missing store is exit 2 naming the path (``NoJobStore``, ending with ``if_missing``:
    how this command's user starts one), and nothing is created."""
    from bulkmail.store.files import NoJobStore
    from bulkmail.store.sql import open_store

    try:
        return open_store(_location(store, settings), create=False)
    except NoJobStore as exc:
        if not if_missing:
            raise
        raise NoJobStore(exc.location, then=if_missing) from None


def create_store_for(
    store: str | None, settings: Settings, *, dedupe_key: str | None, new_store: bool
) -> tuple[JobStore, bool]:
    """send-reminders' store, created when there is none (the only command that creates
    one), and whether it was created just now: the command says so (``say_new_store``)
    once its job is in it. A new store has no dedupe history, so with ``dedupe_key`` one
    is created only when ``new_store`` (the user's `--new-store`)."""
    from bulkmail.store.files import NoJobStore
    from bulkmail.store.sql import open_store

    try:
        db = open_store(_location(store, settings), create=new_store or not dedupe_key)
    except NoJobStore as exc:
        if dedupe_key:
            raise no_dedupe_history(exc.location, dedupe_key) from None
        raise
    return db, db.created


def say_new_store(location: str) -> None:
    say(f"new job store at {location}")


def _location(store: str | None, settings: Settings | None) -> str | None:
    return store or (settings.store if settings is not None else None) or None


def no_dedupe_history(location: str, dedupe_key: str) -> StoreError:
    """The refusal of `--dedupe-key` on a store that does not exist yet: in a new store the
    key has no history, so everyone would be reminded again (a mistyped --store in cron)."""
    return StoreError(
        f"no job store at {location}, so --dedupe-key {dedupe_key!r} has no history there "
        "and everyone would be reminded again; pass --new-store to start a new store "
        "(or fix --store / BULKMAIL_STORE)"
    )


def open_reader_for(
    store: str | None, config: str | None, *, missing_ok: bool = False
) -> StoreReader:
    """The store to read from for status/recent/report: on the embedded SQLite store a
    light read-only reader that never imports SQLAlchemy. It creates nothing: a missing
    store is exit 2 naming the path (``NoJobStore``), or an empty ``NoStore`` when
    ``missing_ok`` (send-reminders reading the history of a store it may create)."""
    from bulkmail.store.readonly import open_reader

    if not store:
        from bulkmail.config import load_settings

        store = load_settings(config=config).store or None
    return open_reader(store, missing_ok=missing_ok)


def print_json(doc: object) -> None:
    try:
        environment().write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    except OSError as exc:
        raise BulkmailError(f"cannot write to standard output: {exc.strerror}") from None


UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""ISO 8601 in UTC, as every time bulkmail prints (the JSON documents, the worker log)."""


def utc_now() -> str:
    """The current time as ``UTC_FORMAT``: ``2026-12-01T08:00:00Z``."""
    return time.strftime(UTC_FORMAT, time.gmtime())


def setup_logging(quiet: bool = False, *, timestamps: bool = False) -> None:
    """Log lines on stderr as every message there: ``bulkmail: text``; with ``timestamps``
    (a worker's log file) each starts with the UTC time, as the worker's own lines do."""
    logger = logging.getLogger("bulkmail")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        if timestamps:
            formatter = logging.Formatter("%(asctime)s bulkmail: %(message)s", UTC_FORMAT)
            formatter.converter = time.gmtime
        else:
            formatter = logging.Formatter("bulkmail: %(message)s")
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
