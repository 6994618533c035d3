"""The command line: options in, one call into the core (``bulkmail.jobs``), Rich out.

The Typer app lives here; its commands are in :mod:`bulkmail.cli.run` (those that send:
send-reminders, resume, retry, cancel, preview, worker) and :mod:`bulkmail.cli.show` (those
that read: status, recent, report), on the options and helpers of
:mod:`bulkmail.cli.common`. What to do with a job in each state and the exit codes are
decided in the core (``bulkmail.jobs``, ``bulkmail.errors``); the commands get their
consoles and terminal facts from one :class:`bulkmail.cli.env.Environment`. Every domain
error (``BulkmailError``) becomes one line on stderr and its exit code, in
``common.handles_errors`` and nowhere else.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Annotated

import typer

from bulkmail import __version__

app = typer.Typer(
    name="bulkmail",
    help="Send personalised, rate-limited reminder emails and track every delivery.\n\n"
    "Example: bulkmail send-reminders --csv examples/instructors.csv "
    "--template examples/reminder.txt --subject 'Reminder: {{ course }}'",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def version_callback(value: bool) -> None:
    if value:
        print(f"bulkmail {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=version_callback, is_eager=True, help="Show version."),
    ] = None,
) -> None:
    """Send personalised, rate-limited reminder emails and track every delivery."""


def _terminated(_signum: int, _frame: FrameType | None) -> None:
    from bulkmail.errors import Terminated

    raise Terminated


def handle_sigterm() -> None:
    """SIGTERM (what `timeout`, cron and systemd send) raises ``Terminated``, a
    KeyboardInterrupt, in the main thread: every command treats it as Ctrl-C (a run finishes
    the message in flight and pauses the job) and exits 143."""
    signal.signal(signal.SIGTERM, _terminated)


def main() -> None:
    handle_sigterm()
    app()


# the commands register themselves on `app`
from bulkmail.cli import run, show, tokens  # noqa: E402

# `bulkmail token ...` for now; to be mounted as `bulkmail serve token ...` with `serve`
app.add_typer(tokens.tokens, name="token")

__all__ = ["app", "handle_sigterm", "main", "run", "show", "tokens"]
