"""Options shared by every command (defined once) and the helpers every command uses:
settings, the store, JSON output, and the one place that turns domain errors into a line
on stderr and the design's exit code."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from bulkmail.errors import BulkmailError, ExitCode

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
    typer.Option("--csv", metavar="PATH", help="CSV file of recipients (email, name, ...)."),
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

T = TypeVar("T")


def err_console() -> Console:
    return Console(stderr=True)


def fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    err_console().print(f"bulkmail: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(int(code))


def handles_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn domain errors into one line on stderr and the design's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except BulkmailError as exc:
            fail(exc.message, exc.exit_code)

    return wrapper


def load_config(config: str | None) -> Any:
    from bulkmail.config import load_settings

    settings = load_settings(config=config)
    for warning in settings.warnings:
        err_console().print(f"bulkmail: warning: {warning}", markup=False, highlight=False)
    return settings


def open_store_for(store: str | None, settings: Any = None) -> Any:
    from bulkmail.store import open_store

    return open_store(store or (settings.store if settings is not None else None) or None)


def open_reader_for(store: str | None, config: str | None) -> Any:
    """The store to read from for status/recent/report: on the embedded SQLite store a
    light read-only reader that never imports SQLAlchemy, and that creates nothing."""
    from bulkmail.store.lite import open_reader

    if not store:
        from bulkmail.config import load_settings

        store = load_settings(config=config).store or None
    return open_reader(store)


def print_json(doc: Any) -> None:
    try:
        sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
        sys.stdout.flush()
    except OSError as exc:
        raise BulkmailError(f"cannot write to standard output: {exc.strerror}") from None


def setup_logging(quiet: bool = False) -> None:
    logger = logging.getLogger("bulkmail")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bulkmail: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
