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
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

if TYPE_CHECKING:
    from typer import _click as click  # the click Typer is built on (its own copy)

from bulkmail import __version__


class _PlainArgument(TyperArgument):
    """An argument shown by its name alone (``JOB_ID``), not ``{JOB_ID}``, ``<int range>``
    or ``x>=1``: what a person types, nothing of the parser's types."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        return name if self.required else f"[{name}]"

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return None

    def _get_number_range_help_str(self) -> str | None:
        return None


class _PlainOption(TyperOption):
    """An option whose help leaves out the parser's range (``x>=1``); it is still checked."""

    def _get_number_range_help_str(self) -> str | None:
        return None


class _Group(TyperGroup):
    """The app's group: each command's arguments and options shown as ``_PlainArgument``
    and ``_PlainOption``."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        for param in getattr(command, "params", ()):
            if type(param) is TyperArgument:
                param.__class__ = _PlainArgument
            elif type(param) is TyperOption:
                param.__class__ = _PlainOption
        return command


app = typer.Typer(
    name="bulkmail",
    cls=_Group,
    help="Send personalised, rate-limited reminder emails and track every delivery.\n\n"
    "Example:\n\n\b\n"
    "  bulkmail send-reminders --csv examples/instructors.csv \\\n"
    "    --template examples/reminder.txt --subject 'Reminder: {{ course }}'",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
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
from bulkmail.cli import events, run, show, tokens  # noqa: E402

__all__ = ["app", "events", "handle_sigterm", "main", "run", "show", "tokens"]
